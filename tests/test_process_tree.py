"""A clean process tree: children die with their parent, and `pyswpt run all` leaves nothing behind.

Worker processes forked by a driver, and the drivers `pyswpt run all` starts,
kept running (with parent pid 1) once their parent was SIGKILLed, beside the
replacements `run all` started; one was still running after `run all` itself
had stopped. Each test collects the pids of a tree from /proc, kills or stops
its root and waits, with a deadline, until none of them runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal

import pika
import psycopg
import pytest
from drivers import (  # noqa: F401 (node_environment is a fixture)
    children,
    descendants,
    healthy,
    is_alive,
    node_environment,
    running,
    spawned_children,
    started_pids,
    wait_for,
)

from pyswpt import topology
from pyswpt.drivers.supervisor import PROGRAMS, STOP_TIMEOUT_SECONDS, listening_sockets

WORKER_PROCESSES = 2
# A process whose parent died stops as on SIGTERM; that takes well under this.
GONE_WITHIN_SECONDS = STOP_TIMEOUT_SECONDS
# Several Python processes start at once: on a loaded two-core machine that takes a while (as in test_full_stack).
STARTED_WITHIN_SECONDS = 30.0
# The drivers of `run all` that can fork worker processes. With one process
# each (the default) they run their worker themselves, and the chores consumer
# and the flusher run in threads of the supervisor; the tests of a whole node
# ask for two, so that there are worker processes to leave behind.
FORKING_DRIVERS = ("consumer", "chores", "flusher")
TWO_WORKER_PROCESSES_EACH = {"PROTOCOL_BROKER_PROCESSES": "2", "CHORES_BROKER_PROCESSES": "2", "FLUSH_PROCESSES": "2"}


def running_pids(pids: set[int]) -> set[int]:
    return {pid for pid in pids if is_alive(pid)}


@pytest.mark.parametrize(
    ("program", "processes_setting"),
    [
        ("consumer", "PROTOCOL_BROKER_PROCESSES"),
        ("flusher", "FLUSH_PROCESSES"),
        ("chores", "CHORES_BROKER_PROCESSES"),
        ("web", "WEBSERVER_PROCESSES"),
    ],
)
def test_worker_processes_stop_when_their_driver_is_killed(node_environment, tmp_path, program, processes_setting):
    _port, environ = node_environment
    environ = {**environ, processes_setting: str(WORKER_PROCESSES)}
    with running(["run", program], environ, tmp_path) as driver:
        # uvicorn's are spawned, beside multiprocessing's resource tracker.
        workers_of = spawned_children if program == "web" else children
        wait_for(lambda: len(workers_of(driver.process.pid)) == WORKER_PROCESSES, "the worker processes")
        workers = descendants(driver.process.pid)

        driver.stop(signal.SIGKILL)

        wait_for(lambda: not running_pids(workers), f"the workers of {program} to stop", GONE_WITHIN_SECONDS)


def every_driver_with_its_workers(node) -> set[int]:
    """The tree of `run all`, once every driver and every driver's worker process runs."""
    wait_for(lambda: set(started_pids(node.log())) == set(PROGRAMS), "every driver to start", STARTED_WITHIN_SECONDS)
    latest = {program: pids[-1] for program, pids in started_pids(node.log()).items()}
    wait_for(
        lambda: all(children(latest[program]) for program in FORKING_DRIVERS),
        "the worker processes of every driver",
        STARTED_WITHIN_SECONDS,
    )
    return descendants(node.process.pid)


def test_nothing_of_run_all_runs_after_it_is_killed(node_environment, tmp_path):
    _port, environ = node_environment
    with running(["run", "all"], {**environ, **TWO_WORKER_PROCESSES_EACH}, tmp_path) as node:
        tree = every_driver_with_its_workers(node)

        node.stop(signal.SIGKILL)

    wait_for(lambda: not running_pids(tree), "every process of run all to stop", GONE_WITHIN_SECONDS)


def test_nothing_of_run_all_runs_after_it_stops(node_environment, tmp_path):
    """A driver killed under `run all` leaves no worker behind, then or after `run all` stops."""
    _port, environ = node_environment
    with running(["run", "all"], {**environ, **TWO_WORKER_PROCESSES_EACH}, tmp_path) as node:
        tree = every_driver_with_its_workers(node)
        [consumer] = started_pids(node.log())["consumer"]
        os.kill(consumer, signal.SIGKILL)
        wait_for(lambda: len(started_pids(node.log())["consumer"]) == 2, "the consumer to be restarted")
        tree |= every_driver_with_its_workers(node)

        status = node.stop(signal.SIGTERM)

    assert status == 0
    wait_for(lambda: not running_pids(tree), "every process of run all to stop", GONE_WITHIN_SECONDS)


def test_run_all_kills_what_a_killed_driver_left_before_starting_it_again(
    node_environment, database_url, rabbitmq_url, tmp_path
):
    """A worker that cannot stop (its batch waits for a lock) is killed with its driver's process group."""
    _port, environ = node_environment
    queue = environ["PROTOCOL_BROKER_QUEUE"]
    environ = {**environ, **TWO_WORKER_PROCESSES_EACH}
    with running(["run", "all"], environ, tmp_path) as node, psycopg.connect(database_url) as locker:
        every_driver_with_its_workers(node)
        [consumer] = started_pids(node.log())["consumer"]
        workers = children(consumer)
        locker.execute("LOCK TABLE pyswpt.account IN ACCESS EXCLUSIVE MODE")
        publish_configure_account(rabbitmq_url, queue)
        wait_for(lambda: waits_for_a_lock(database_url, f"pyswpt consumer {queue}"), "the batch to wait for the lock")

        os.kill(consumer, signal.SIGKILL)

        wait_for(lambda: not running_pids(workers), "the workers to be killed", STOP_TIMEOUT_SECONDS + 10)
        wait_for(lambda: len(started_pids(node.log())["consumer"]) == 2, "the consumer to be restarted")
        locker.rollback()
        log = node.log()
        killed = log.index(f"Processes of consumer's group {consumer} did not stop in time; killing them.")
        assert killed < log.rindex("Started consumer")


def test_with_the_defaults_run_all_is_four_processes(node_environment, tmp_path):
    """A driver runs its one worker itself, and the chores consumer, the flusher and the scanners run in
    threads of the supervisor: a process less each (about 42 MiB of resident memory)."""
    _port, environ = node_environment
    with running(["run", "all"], environ, tmp_path) as node:
        wait_for(
            lambda: set(started_pids(node.log())) == set(PROGRAMS), "every driver to start", STARTED_WITHIN_SECONDS
        )
        drivers = {program: pids[-1] for program, pids in started_pids(node.log()).items()}
        wait_for(lambda: "Starting the flusher" in node.log(), "the flusher's first line")

        in_processes = {program: pid for program, pid in drivers.items() if pid != node.process.pid}
        assert sorted(in_processes) == ["consumer", "web", "workers"]
        assert descendants(node.process.pid) == set(in_processes.values())
        assert all(is_alive(pid) for pid in in_processes.values())


def test_run_all_runs_each_web_process_as_a_driver_sharing_the_port(node_environment, tmp_path):
    """No uvicorn parent process that only watches its workers: the supervisor starts and restarts each."""
    port, environ = node_environment
    with running(["run", "all"], {**environ, "WEBSERVER_PROCESSES": "2"}, tmp_path) as node:
        wait_for(lambda: len(started_pids(node.log()).get("web", [])) == 2, "two web drivers", STARTED_WITHIN_SECONDS)
        first, second = started_pids(node.log())["web"]
        wait_for(lambda: listening_sockets(port) == 2, "both to listen on the port", STARTED_WITHIN_SECONDS)
        assert healthy(port)
        assert {first, second} <= set(children(node.process.pid))
        assert children(first) == children(second) == []

        os.kill(first, signal.SIGKILL)

        wait_for(lambda: len(started_pids(node.log())["web"]) == 3, "the web restart", STARTED_WITHIN_SECONDS)
        third = started_pids(node.log())["web"][-1]
        wait_for(lambda: listening_sockets(port) == 2, "the restarted one to listen", STARTED_WITHIN_SECONDS)
        assert is_alive(second) and is_alive(third) and not is_alive(first)
        assert healthy(port)
        assert node.log().count("this one of them, sharing the port") == 3

        assert node.stop(signal.SIGTERM) == 0
    assert "did not stop in time" not in node.log()
    assert not is_alive(second) and not is_alive(third)


def publish_configure_account(rabbitmq_url: str, queue: str) -> None:
    fields = {
        "type": "ConfigureAccount",
        "debtor_id": 1,
        "creditor_id": 2,
        "negligible_amount": 0.0,
        "config_data": "",
        "config_flags": 0,
        "seqnum": 1,
        "ts": dt.datetime.now(dt.UTC).isoformat(),
    }
    properties = pika.BasicProperties(content_type="application/json", type="ConfigureAccount", delivery_mode=2)
    with topology.open_channel(rabbitmq_url) as channel:
        channel.basic_publish("", queue, json.dumps(fields).encode(), properties)


def waits_for_a_lock(database_url: str, application_name: str) -> bool:
    with psycopg.connect(database_url, autocommit=True) as observer:
        return observer.execute(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock')",
            (application_name,),
        ).fetchone()[0]
