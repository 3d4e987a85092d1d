"""`pyswpt run all`: every driver of one node, restarted when it dies.

Each driver runs as its own `pyswpt run <name>` process, so that what runs
under the supervisor is exactly what the tests start one by one. A driver that
exits is started again after a backoff that grows while it keeps failing
quickly. SIGTERM or SIGINT stops every driver with SIGTERM — each finishes its
current batch, acks what committed and closes its connections — and kills
the ones still running after STOP_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import subprocess
import sys
import time

from pyswpt.config import Config
from pyswpt.processes import stop_event_on_signals

logger = logging.getLogger(__name__)

# The long-running programs of one node (spec 01 §8.2).
PROGRAMS = (
    "web",
    "consumer",
    "chores",
    "flusher",
    "workers",
    "scan-accounts",
    "scan-prepared-transfers",
    "scan-registered-balance-changes",
)
STOP_TIMEOUT_SECONDS = 25.0
# A driver that stayed up this long counts as started: its next failure restarts at once.
STARTED_AFTER_SECONDS = 30.0
RESTART_BACKOFF_SECONDS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
POLL_SECONDS = 0.5


@dataclasses.dataclass
class Child:
    program: str
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "pyswpt.cli", "run", self.program])
        self.started_at = time.monotonic()
        logger.info("Started %s (pid %d).", self.program, self.process.pid)

    def check(self, now: float) -> None:
        """Restart the driver if it exited, after a backoff if it keeps failing fast."""
        if self.process is not None:
            status = self.process.poll()
            if status is None:
                return
            ran_seconds = now - self.started_at
            self.quick_failures = 0 if ran_seconds >= STARTED_AFTER_SECONDS else self.quick_failures + 1
            pause = RESTART_BACKOFF_SECONDS[min(self.quick_failures, len(RESTART_BACKOFF_SECONDS) - 1)]
            logger.error(
                "%s (pid %d) exited with status %s after %.1f s; restarting in %.0f s.",
                self.program,
                self.process.pid,
                describe_status(status),
                ran_seconds,
                pause,
            )
            self.process = None
            self.restart_at = now + pause
        if now >= self.restart_at:
            self.start()


def describe_status(status: int) -> str:
    if status < 0:
        return f"{status} (killed by {signal.Signals(-status).name})"
    return str(status)


def run(config: Config, programs: tuple[str, ...] = PROGRAMS) -> int:
    stopping = stop_event_on_signals()
    children = [Child(program) for program in programs]
    while not stopping.is_set():
        now = time.monotonic()
        for child in children:
            child.check(now)
        stopping.wait(POLL_SECONDS)
    stop_all(children)
    return 0


def stop_all(children: list[Child]) -> None:
    running = [child for child in children if child.process is not None and child.process.poll() is None]
    for child in running:
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for child in running:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) did not stop in time; killing it.", child.program, child.process.pid)
            child.process.kill()
            child.process.wait()
    logger.info("All drivers stopped.")

