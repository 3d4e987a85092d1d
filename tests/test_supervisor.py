"""`pyswpt run all`: every driver started, a dead one restarted, all stopped on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import httpx
import pytest

from drivers import driver_environment, free_port, running, wait_for
from pyswpt import topology
from pyswpt.drivers.supervisor import PROGRAMS, STOP_TIMEOUT_SECONDS

STARTED = re.compile(r"Started (\S+) \(pid (\d+)\)")


def started_pids(log: str) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for program, pid in STARTED.findall(log):
        pids.setdefault(program, []).append(int(pid))
    return pids


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/accounts/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def node_environment(database_url, rabbitmq_url):
    queue = f"test_all_{uuid.uuid4().hex[:8]}"
    chores_queue = f"{queue}_chores"
    topology.subscribe(rabbitmq_url, queue, "#")
    topology.declare_chores_queue(rabbitmq_url, chores_queue)
    port = free_port()
    yield port, driver_environment(
        database_url,
        rabbitmq_url,
        PROTOCOL_BROKER_QUEUE=queue,
        CHORES_BROKER_QUEUE=chores_queue,
        WEBSERVER_PORT=str(port),
        FETCH_API_URL=f"http://127.0.0.1:{port}",
    )
    with topology.open_channel(rabbitmq_url) as channel:
        for name in (queue, topology.dead_letter_queue_name(queue), chores_queue):
            channel.queue_delete(name)


def test_all_starts_every_driver_and_restarts_a_killed_one(node_environment, tmp_path):
    port, environ = node_environment
    with running(["run", "all"], environ, tmp_path) as node:
        wait_for(lambda: set(started_pids(node.log())) == set(PROGRAMS), "every driver to start")
        wait_for(lambda: healthy(port), "the fetch API")
        [web_pid] = started_pids(node.log())["web"]

        os.kill(web_pid, signal.SIGKILL)

        wait_for(lambda: len(started_pids(node.log())["web"]) == 2, "the web server to be restarted")
        assert f"web (pid {web_pid}) exited with status -9 (killed by SIGKILL)" in node.log()
        wait_for(lambda: healthy(port), "the restarted fetch API")
        node.assert_alive()


def test_all_stops_every_driver_on_sigterm_within_the_bound(node_environment, tmp_path):
    port, environ = node_environment
    with running(["run", "all"], environ, tmp_path) as node:
        wait_for(lambda: healthy(port), "the fetch API")
        wait_for(lambda: set(started_pids(node.log())) == set(PROGRAMS), "every driver to start")
        pids = [pids[-1] for pids in started_pids(node.log()).values()]

        started = time.monotonic()
        status = node.stop(signal.SIGTERM)
        stopped_after_seconds = time.monotonic() - started

    assert status == 0
    assert stopped_after_seconds < STOP_TIMEOUT_SECONDS + 5
    assert [pid for pid in pids if is_alive(pid)] == []
    assert "did not stop in time" not in node.log()
