"""`pyswpt run all`: every driver started, a dead one restarted, all stopped on SIGTERM."""

from __future__ import annotations

import os
import signal
import time

# tests/test_full_stack.py imports free_port, healthy, is_alive and started_pids from here.
from drivers import free_port, healthy, is_alive, node_environment, running, started_pids, wait_for  # noqa: F401

from pyswpt.drivers.supervisor import PROGRAMS, STOP_TIMEOUT_SECONDS

# Nine Python processes start at once: on a loaded two-core machine that takes a while (as in test_full_stack).
STARTED_WITHIN_SECONDS = 30.0


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
