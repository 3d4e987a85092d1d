"""`pyswpt run all`: every driver started, a dead one restarted, all stopped on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

# tests/test_full_stack.py imports free_port, healthy, is_alive and started_pids from here.
from drivers import (  # noqa: F401
    free_port,
    healthy,
    is_alive,
    node_environment,
    pyswpt_command,
    running,
    started_pids,
    wait_for,
)
from prometheus_client import REGISTRY

from pyswpt import config as settings
from pyswpt import logs, metrics
from pyswpt.drivers import supervisor
from pyswpt.drivers import web as web_driver
from pyswpt.drivers.supervisor import PROGRAMS, STOP_TIMEOUT_SECONDS
from pyswpt.processes import ORPHANED_AT_START_STATUS, SUPERVISOR_PID_VARIABLE, WEBSERVER_SHARES_PORT_VARIABLE
from pyswpt.upgrades import EXIT_API_UNAVAILABLE, ApiUnavailable

# Several Python processes start at once: on a loaded two-core machine that takes a while (as in test_full_stack).
STARTED_WITHIN_SECONDS = 30.0
# A node on this small shared machine takes a while to start its six drivers.
NODE_START_SECONDS = 90.0


def test_all_starts_every_driver_and_restarts_a_killed_one(node_environment, tmp_path):
    port, environ = node_environment
    with running(["run", "all"], environ, tmp_path) as node:
        wait_for(
            lambda: set(started_pids(node.log())) == set(PROGRAMS), "every driver to start", STARTED_WITHIN_SECONDS
        )
        wait_for(lambda: healthy(port), "the fetch API", STARTED_WITHIN_SECONDS)
        [web_pid] = started_pids(node.log())["web"]

        os.kill(web_pid, signal.SIGKILL)

        wait_for(lambda: len(started_pids(node.log())["web"]) == 2, "the web server to be restarted")
        assert f"web (pid {web_pid}) exited with status -9 (killed by SIGKILL)" in node.log()
        wait_for(lambda: healthy(port), "the restarted fetch API")
        node.assert_alive()


def test_a_driver_in_a_thread_that_fails_is_started_again_alone(caplog):
    """As a driver's process that exits: logged, started again after the backoff, the others untouched."""
    runs = []

    def fails_on_its_first_run(stopping: threading.Event) -> None:
        runs.append(threading.current_thread())
        if len(runs) == 1:
            raise RuntimeError("boom")
        stopping.wait()

    failing = supervisor.InThread("failing", target=fails_on_its_first_run)
    steady = supervisor.InThread("steady", target=lambda stopping: stopping.wait())
    restarts_before = restarts_of("failing")
    for driver in (failing, steady):
        driver.check(time.monotonic())
    steady_thread = steady.thread
    wait_for(lambda: not failing.thread.is_alive(), "the first run to fail")

    failed_at = time.monotonic()
    assert failing.check(failed_at) is None
    assert not failing.is_running()
    assert "failing (in a thread) failed (RuntimeError: boom) after 0.0 s; restarting in 1 s." in caplog.text
    assert 'raise RuntimeError("boom")' in caplog.text  # its traceback, as a driver process logs
    failing.check(failed_at + supervisor.backoff_seconds(1))

    assert failing.is_running() and len(runs) == 2
    assert restarts_of("failing") == restarts_before + 1
    assert steady.thread is steady_thread and steady.is_running()
    assert supervisor.stop_all([failing, steady]) == []
    assert not failing.thread.is_alive() and not steady.thread.is_alive()


@pytest.mark.parametrize(
    ("program", "processes_setting"), [("chores", "CHORES_BROKER_PROCESSES"), ("flusher", "FLUSH_PROCESSES")]
)
def test_a_driver_of_one_process_runs_in_a_thread_and_of_several_in_processes(program, processes_setting):
    assert supervisor.in_thread_target(program, settings.load({processes_setting: "1"})) is not None
    assert supervisor.in_thread_target(program, settings.load({processes_setting: "2"})) is None


def test_a_fetch_api_of_several_processes_is_as_many_web_drivers_sharing_the_port():
    web = supervisor.supervised("web", settings.load({"WEBSERVER_PROCESSES": "3"}))
    assert len(web) == 3 and len({id(child) for child in web}) == 3
    assert all(isinstance(child, supervisor.Child) and child.program == "web" for child in web)
    assert all(child.environment == {WEBSERVER_SHARES_PORT_VARIABLE: "1"} for child in web)
    [alone] = supervisor.supervised("web", settings.load({"WEBSERVER_PROCESSES": "1"}))
    assert alone.environment == {}


def test_a_fetch_api_of_several_processes_is_ready_when_each_listens():
    """A connection succeeds once the first of them listens: the ready line waits for the others."""
    port = free_port()
    config = settings.load({"WEBSERVER_PORT": str(port)})
    web = [supervisor.InThread("web", target=lambda stopping: stopping.wait()) for _ in range(2)]
    for driver in web:
        driver.check(time.monotonic())
    try:
        with shared_listening_socket(port):
            assert supervisor.listening_sockets(port) == 1
            assert not supervisor.is_ready(config, web)
            with shared_listening_socket(port):
                assert supervisor.listening_sockets(port) == 2
                assert supervisor.is_ready(config, web)
        assert not supervisor.is_ready(config, web)
    finally:
        supervisor.stop_all(web)


@contextlib.contextmanager
def shared_listening_socket(port: int) -> Iterator[socket.socket]:
    """A socket listening on `port` as each web process of `run all` does (pyswpt.drivers.web.shared_socket)."""
    with web_driver.shared_socket(port) as listening:
        listening.listen()
        yield listening


def restarts_of(program: str) -> float:
    return REGISTRY.get_sample_value("pyswpt_driver_restarts_total", {"driver": program}) or 0.0


def test_a_driver_in_a_thread_that_gave_up_on_its_sql_api_stops_the_node_without_a_restart(caplog):
    def gives_up(_stopping: threading.Event) -> None:
        raise ApiUnavailable("Stopping the scanner: its SQL API stayed missing.")

    driver = supervisor.InThread("scanners", target=gives_up)
    driver.check(time.monotonic())
    wait_for(lambda: not driver.thread.is_alive(), "the driver to give up")

    assert driver.check(time.monotonic()) == EXIT_API_UNAVAILABLE
    assert driver.thread is None and driver.runs == 1
    assert "Stopping the scanner: its SQL API stayed missing." in caplog.text
    assert "scanners found no SQL API it can use; stopping the node." in caplog.text


def test_a_driver_in_a_thread_that_does_not_stop_in_time_is_left_to_end_with_the_supervisor(monkeypatch, caplog):
    released = threading.Event()
    stubborn = supervisor.InThread("stubborn", target=lambda _stopping: released.wait())
    stubborn.check(time.monotonic())
    monkeypatch.setattr(supervisor, "STOP_TIMEOUT_SECONDS", 0.1)
    try:
        assert supervisor.stop_all([stubborn]) == ["stubborn"]
        assert stubborn.thread.daemon and stubborn.thread.is_alive()
        assert "stubborn (in a thread) did not stop in time; it ends as the supervisor exits." in caplog.text
    finally:
        released.set()


def test_all_serves_the_metrics_itself_and_waits_for_its_port_while_the_drivers_run(node_environment, tmp_path):
    _port, environ = node_environment
    metrics_port = int(environ["METRICS_PORT"])
    with socket.socket() as squatter:
        squatter.bind((metrics.LISTEN_HOST, metrics_port))
        squatter.listen()
        with running(["run", "all"], environ, tmp_path) as node:
            wait_for(
                lambda: set(started_pids(node.log())) == set(PROGRAMS), "every driver to start", STARTED_WITHIN_SECONDS
            )
            wait_for(lambda: f"cannot listen on port {metrics_port}" in node.log(), "the endpoint's failure")
            # The ledger does not wait for its metrics.
            wait_for(lambda: "Node ready:" in node.log(), "the ready line", NODE_START_SECONDS)
            assert (
                f"; metrics not served yet (port {metrics_port}: [Errno 98] Address already in use; trying again); "
                in node.log()
            )

            squatter.close()

            wait_for(lambda: f"listens on port {metrics_port} now" in node.log(), "the endpoint", NODE_START_SECONDS)
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert "pyswpt_database_metrics_up 1.0" in text
            # No process of its own: the supervisor serves the drivers' metrics, and the drivers never stopped.
            assert "metrics" not in started_pids(node.log())
            assert all(len(pids) == 1 for pids in started_pids(node.log()).values())
            node.assert_alive()


def test_a_driver_whose_supervisor_is_gone_before_it_starts_exits_at_once(node_environment):
    """The driver arms its parent-death signal itself, then finds another parent than the supervisor named."""
    _port, environ = node_environment
    # As under `run all`, where a driver serves no metrics endpoint of its own.
    environ = {name: value for name, value in environ.items() if name != "METRICS_PORT"}
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = subprocess.run(
        [*pyswpt_command(), "run", "web"],
        env={**environ, SUPERVISOR_PID_VARIABLE: str(gone.pid)},
        capture_output=True,
        timeout=NODE_START_SECONDS,
    )
    assert orphan.returncode == ORPHANED_AT_START_STATUS
    assert orphan.stdout == b""
    assert orphan.stderr == f"The parent process (pid {gone.pid}) is gone; exiting before anything started.\n".encode()


def test_all_stops_every_driver_on_sigterm_within_the_bound(node_environment, tmp_path):
    port, environ = node_environment
    with running(["run", "all"], environ, tmp_path) as node:
        wait_for(lambda: healthy(port), "the fetch API", STARTED_WITHIN_SECONDS)
        wait_for(
            lambda: set(started_pids(node.log())) == set(PROGRAMS), "every driver to start", STARTED_WITHIN_SECONDS
        )
        pids = [pids[-1] for pids in started_pids(node.log()).values()]

        started = time.monotonic()
        status = node.stop(signal.SIGTERM)
        stopped_after_seconds = time.monotonic() - started

    assert status == 0
    assert stopped_after_seconds < STOP_TIMEOUT_SECONDS + 5
    assert [pid for pid in pids if is_alive(pid)] == []
    assert "did not stop in time" not in node.log()


def test_all_prints_its_ready_and_stop_lines_on_stdout_at_log_level_warning(node_environment, tmp_path):
    port, environ = node_environment
    environ = {**environ, "APP_LOG_LEVEL": "warning"}
    stdout_path, stderr_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        node = subprocess.Popen([*pyswpt_command(), "run", "all"], env=environ, stdout=stdout, stderr=stderr)
    try:
        wait_for(lambda: "Node ready:" in stdout_path.read_text(), "the ready line", NODE_START_SECONDS)
        # Ready means the fetch API answers already.
        assert healthy(port)
    finally:
        node.send_signal(signal.SIGTERM)
        status = node.wait(timeout=STOP_TIMEOUT_SECONDS + 10)

    assert status == 0
    lines = stdout_path.read_text().splitlines()
    [ready] = [line for line in lines if "Node ready:" in line]
    assert ready.endswith(
        f":INFO:pyswpt.node:Node ready: {len(PROGRAMS)} drivers running ({', '.join(PROGRAMS)}); "
        f"fetch API on port {port}; metrics on port {environ['METRICS_PORT']}; "
        f"consuming queue {environ['PROTOCOL_BROKER_QUEUE']} with routing key #; "
        "shard realm 0x00000000/0x00000000 (realm/mask of the hash space)."
    )
    assert lines[-1].endswith(f":INFO:pyswpt.node:Node stopped: received SIGTERM; {len(PROGRAMS)} drivers stopped.")
    # The other INFO lines, such as each driver's start, stay below the WARNING level asked for.
    assert [line for line in lines if ":INFO:" in line] == [ready, lines[-1]]


@pytest.fixture
def restored_logging():
    """configure_logging changes the process's loggers: put them back for the tests that follow."""
    loggers = [logging.getLogger(name) for name in ("", "pyswpt", "pyswpt.node")]
    saved = [(found, found.level, found.handlers[:]) for found in loggers]
    yield
    for found, level, handlers in saved:
        found.setLevel(level)
        found.handlers[:] = handlers


def test_the_ready_line_in_json_keeps_the_reference_keys_and_adds_fields(capsys, restored_logging):
    config = settings.load({"APP_LOG_FORMAT": "json", "PROTOCOL_BROKER_QUEUE_ROUTING_KEY": "1.#"})
    logs.configure_logging(config)
    supervisor.show_node_lines()

    endpoint = supervisor.MetricsEndpoint(free_port(), postgres_url="")
    endpoint.check(time.monotonic())
    try:
        supervisor.announce_ready(config, [supervisor.Child(program) for program in PROGRAMS], endpoint)
    finally:
        endpoint.stop()

    entry = json.loads(capsys.readouterr().out)
    assert (entry["levelname"], entry["name"]) == ("INFO", "pyswpt.node")
    assert entry["message"].startswith(f"Node ready: {len(PROGRAMS)} drivers running")
    assert entry["asctime"][10] == "T"
    assert entry["drivers"] == list(PROGRAMS)
    assert (entry["fetch_api_port"], entry["queue"], entry["routing_key"]) == (8080, "swpt_accounts", "1.#")
    assert entry["metrics_port"] == endpoint.port
    assert entry["shard_realm"] == "0x80000000/0x80000000"
