"""Starting pyswpt commands as real subprocesses, and waiting without sleeping blindly."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

POLL_INTERVAL_SECONDS = 0.05
STOP_DEADLINE_SECONDS = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pyswpt_command() -> list[str]:
    script = Path(sys.executable).with_name("pyswpt")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "pyswpt.cli"]


def wait_for(condition: Callable[[], object], what: str, deadline_seconds: float = 20.0) -> None:
    """Poll `condition` until it is true; fail the test after `deadline_seconds`."""
    deadline = time.monotonic() + deadline_seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {deadline_seconds} s waiting for {what}")
        time.sleep(POLL_INTERVAL_SECONDS)


def driver_environment(postgres_url: str, rabbitmq_url: str, **settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "POSTGRES_URL": postgres_url,
        "PROTOCOL_BROKER_URL": rabbitmq_url,
        "CHORES_BROKER_URL": rabbitmq_url,
        "APP_LOG_LEVEL": "info",
        **settings,
    }


@dataclasses.dataclass
class Running:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"the process exited with {self.process.returncode}:\n{self.log()}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=STOP_DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the process did not stop within {STOP_DEADLINE_SECONDS} s:\n{self.log()}")


@contextlib.contextmanager
def running(args: list[str], environ: dict[str, str], log_dir: Path) -> Iterator[Running]:
    """`pyswpt *args` in the background, stopped with SIGTERM when the block ends."""
    log_path = log_dir / f"{'-'.join(args)}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [*pyswpt_command(), *args], env=environ, stdout=log_file, stderr=subprocess.STDOUT
        )
    started = Running(process, log_path)
    try:
        yield started
    finally:
        started.stop()
