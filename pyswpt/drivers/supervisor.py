"""`pyswpt run all`: every driver of one node, restarted when it dies.

The busy drivers run as their own `pyswpt run <name>` processes, so that what
runs under the supervisor is what the tests start one by one. The drivers
that wait most of the time — the chores consumer, the scanners, and the
flusher, which waits for its takes, the WAL flush and the broker's confirms —
run in threads of the supervisor (in_thread_target): an interpreter with its
libraries is about 42 MiB of resident memory. A fetch API of several
processes (WEBSERVER_PROCESSES) runs as that many `run web` drivers sharing
the port, instead of one whose uvicorn parent process does nothing but watch
the others. A driver whose process exits, or whose thread ends, is started
again alone, after a backoff that grows while it keeps failing
quickly. SIGTERM or SIGINT stops every driver, a process with SIGTERM — each
finishes its current batch, acks what committed and closes its connections —
and kills the processes still running after STOP_TIMEOUT_SECONDS.

The drivers write their metrics to the node's PROMETHEUS_MULTIPROC_DIR,
prepared by `pyswpt run` before this module is imported (pyswpt.cli.metrics_of),
and the supervisor serves them on METRICS_PORT from threads of its own
(MetricsEndpoint), with the restarts it counts: the same endpoint as `pyswpt
run metrics`, without one more interpreter and its libraries (about 45 MiB
resident) to keep. Threads are why no driver is prepared between fork and
exec (preexec_fn): each arms its parent-death signal itself.

A driver that gave up waiting for its SQL API (pyswpt.upgrades), in a process
or a thread, is not restarted: the database belongs to a release this node
cannot work with, and a restart would only wait out the same bound again while
the node looked healthy. The whole node stops the same way and exits with the
driver's status, so that the container shows the failure and its log ends
with the driver's line saying what to do.

Nothing of the tree outlives it. Each driver dies with the supervisor
(processes.die_with_supervisor), and its worker processes die with the driver.
Each driver also leads a process group of its own, which its workers inherit
and keep even once orphaned: the supervisor waits for a dead driver's group
to empty before starting it again, so that old workers never run beside their
replacements, and on the way out it kills every group that is not empty
after STOP_TIMEOUT_SECONDS. An operator can stop one driver with everything
it started likewise: `kill -- -PID`. A thread cannot be killed: one that does
not stop in time ends as the supervisor exits.

Whatever APP_LOG_LEVEL says, the supervisor logs one line at INFO when the
node is ready (every driver running and each process of the fetch API
listening, a connection to it accepted) and one when it stopped, with why: an
operator who starts a node sees that it is up, where, and on which queue,
without turning on the drivers' chatter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from pyswpt import metrics
from pyswpt.config import Config
from pyswpt.drivers import chores, flusher
from pyswpt.drivers.scanners import every
from pyswpt.processes import (
    SUPERVISOR_PID_VARIABLE,
    WEBSERVER_SHARES_PORT_VARIABLE,
    StopRequest,
    stop_event_on_signals,
)
from pyswpt.upgrades import EXIT_API_UNAVAILABLE, ApiUnavailable

logger = logging.getLogger(__name__)
# The ready and stop lines, shown at any log level (see show_node_lines).
node_logger = logging.getLogger("pyswpt.node")

# The long-running programs of one node (spec 01 §8.2); the supervisor serves the metrics itself.
PROGRAMS = (
    "web",
    "consumer",
    "chores",
    "flusher",
    "workers",
    # scan-accounts, scan-prepared-transfers and scan-registered-balance-changes.
    "scanners",
)
# The drivers that wait most of the time, run in threads of the supervisor (in_thread_target).
THREAD_TARGETS: dict[str, Callable[[Config, threading.Event], None]] = {
    "chores": chores.run_in_thread,
    "flusher": flusher.run_in_thread,
    "scanners": every.scan_every_table,
}
STOP_TIMEOUT_SECONDS = 25.0
# A driver that stayed up this long counts as started: its next failure restarts at once.
STARTED_AFTER_SECONDS = 30.0
RESTART_BACKOFF_SECONDS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
POLL_SECONDS = 0.5
# The fetch API is ready once a connection to its port succeeds within this time.
PORT_PROBE_TIMEOUT_SECONDS = 0.2
LOCALHOST = "127.0.0.1"
# The kernel's table of IPv4 TCP sockets (the fetch API listens on 0.0.0.0), and its LISTEN state.
TCP_SOCKETS_TABLE = Path("/proc/net/tcp")
TCP_LISTEN = "0A"


@dataclasses.dataclass
class Supervised:
    """What a driver's restarts have in common, whether it runs in a process or a thread."""

    program: str
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float = 0.0
    runs: int = 0

    def count_start(self) -> None:
        if self.runs:
            metrics.DRIVER_RESTARTS.labels(self.program).inc()
        self.runs += 1
        self.started_at = time.monotonic()

    def schedule_restart(self, now: float, what: str, how: str, error: BaseException | None = None) -> None:
        """Say how the driver ended (`what` names it, `how` says what happened, `error` is what it
        raised, if it ran in a thread) and when it starts again."""
        ran_seconds = now - self.started_at
        self.quick_failures = 0 if ran_seconds >= STARTED_AFTER_SECONDS else self.quick_failures + 1
        pause = backoff_seconds(self.quick_failures)
        logger.error("%s %s after %.1f s; restarting in %.0f s.", what, how, ran_seconds, pause, exc_info=error)
        self.restart_at = now + pause


@dataclasses.dataclass
class Child(Supervised):
    """A driver in a process of its own, with the process group it leads."""

    environment: dict[str, str] = dataclasses.field(default_factory=dict)  # set for the driver alone
    process: subprocess.Popen | None = None
    # The process group of the driver's last run (its pid), and when to kill what still runs in it.
    group: int | None = None
    group_kill_at: float = 0.0

    def start(self) -> None:
        # Called from the main thread only: the parent-death signal follows the thread that forks.
        self.count_start()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyswpt.cli", "run", self.program],
            process_group=0,
            env={**os.environ, **self.environment, SUPERVISOR_PID_VARIABLE: str(os.getpid())},
        )
        self.group = self.process.pid
        logger.info("Started %s (pid %d).", self.program, self.process.pid)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self, now: float) -> int | None:
        """Restart the driver if it exited, after a backoff if it keeps failing fast.

        Returns EXIT_API_UNAVAILABLE, without a restart, when the driver exited with it.
        """
        if self.process is not None:
            status = self.process.poll()
            if status is None:
                return None
            if status == EXIT_API_UNAVAILABLE:
                logger.critical(
                    "%s (pid %d) found no SQL API it can use (see its line above); stopping the node.",
                    self.program,
                    self.process.pid,
                )
                self.process = None
                return status
            what = f"{self.program} (pid {self.process.pid})"
            self.schedule_restart(now, what, f"exited with status {describe_status(status)}")
            metrics.forget_process(self.process.pid)
            self.process = None
            self.group_kill_at = now + STOP_TIMEOUT_SECONDS
        if now >= self.restart_at and self.group_is_gone(now):
            self.start()
        return None

    def request_stop(self) -> None:
        if self.is_running():
            self.process.send_signal(signal.SIGTERM)

    def finish_stop(self, deadline: float) -> bool:
        """Wait for the driver until `deadline`, then kill it; True if it had to be killed."""
        if self.process is None:
            return False
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) did not stop in time; killing it.", self.program, self.process.pid)
            self.process.kill()
            self.process.wait()
            return True
        return False

    def clear_group(self, deadline: float) -> None:
        """The driver stops its own workers, but a driver that was killed left its workers behind."""
        while group_is_running(self.group) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        if group_is_running(self.group):
            self.kill_group()

    def group_is_gone(self, now: float) -> bool:
        """Whether the last run's workers have ended; they are killed after STOP_TIMEOUT_SECONDS."""
        if not group_is_running(self.group):
            return True
        if now < self.group_kill_at:
            return False
        self.kill_group()
        return True

    def kill_group(self) -> None:
        logger.error("Processes of %s's group %d did not stop in time; killing them.", self.program, self.group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.group, signal.SIGKILL)


@dataclasses.dataclass
class InThread(Supervised):
    """A driver in a thread of the supervisor: `target(stopping)` runs until `stopping` is set.

    Its failure is the thread's own: the other drivers run on, and the thread
    is started again with the same backoff as a process.
    """

    target: Callable[[threading.Event], None] | None = None
    thread: threading.Thread | None = None
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None

    def start(self) -> None:
        self.count_start()
        self.stopping = threading.Event()
        self.error = None
        # A daemon: a thread that does not stop in time must not hold up the supervisor's exit.
        self.thread = threading.Thread(target=self.run, name=self.program, daemon=True)
        self.thread.start()
        logger.info("Started %s in a thread (pid %d).", self.program, os.getpid())

    def run(self) -> None:
        try:
            self.target(self.stopping)
        except BaseException as error:  # noqa: BLE001 - reported by check(), in the main thread
            self.error = error

    def is_running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def check(self, now: float) -> int | None:
        """As Child.check: restart the driver if its thread ended, unless it gave up on its SQL API."""
        if self.thread is not None:
            if self.thread.is_alive():
                return None
            self.thread = None
            if isinstance(self.error, ApiUnavailable):
                logger.critical("%s", self.error)
                logger.critical("%s found no SQL API it can use; stopping the node.", self.program)
                return EXIT_API_UNAVAILABLE
            how = "ended" if self.error is None else f"failed ({type(self.error).__name__}: {self.error})"
            # With its traceback, as a driver's process logs what ended it.
            self.schedule_restart(now, f"{self.program} (in a thread)", how, self.error)
        if now >= self.restart_at:
            self.start()
        return None

    def request_stop(self) -> None:
        self.stopping.set()

    def finish_stop(self, deadline: float) -> bool:
        """Wait for the thread until `deadline`; True if it is still running (it ends as the supervisor exits)."""
        if self.thread is None:
            return False
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            logger.error("%s (in a thread) did not stop in time; it ends as the supervisor exits.", self.program)
            return True
        return False

    def clear_group(self, deadline: float) -> None:
        """A thread leads no process group."""


@dataclasses.dataclass
class MetricsEndpoint:
    """The node's metrics endpoint (pyswpt.metrics.node_registry), served from threads of the supervisor.

    A port it cannot listen on is tried again after a pause that grows, as a
    driver that keeps failing is restarted, while the drivers run on and the
    node is ready without it: a ledger does not wait for its metrics. A scrape
    runs in a thread of its own and never fails (the database's figures are
    left out when it cannot be read), so nothing of it reaches the main thread.
    """

    port: int
    postgres_url: str
    server: WSGIServer | None = None
    failures: int = 0
    retry_at: float = 0.0
    last_error: OSError | None = None

    def check(self, now: float) -> None:
        if self.server is not None or now < self.retry_at:
            return
        try:
            self.server = metrics.serve(self.port, metrics.node_registry(self.postgres_url))
            if self.failures:
                logger.warning(
                    "The metrics endpoint listens on port %d now, after %d failed tries.", self.port, self.failures
                )
        except OSError as error:
            self.last_error = error
            self.failures += 1
            pause = backoff_seconds(self.failures)
            logger.error(
                "The metrics endpoint cannot listen on port %d (%s); trying again in %.0f s.", self.port, error, pause
            )
            self.retry_at = now + pause

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def backoff_seconds(failures: int) -> float:
    """The pause before the next start after `failures` quick failures in a row."""
    return RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS) - 1)]


def group_is_running(group: int | None) -> bool:
    """Whether a process group still has members (zombies not yet reaped count too)."""
    if group is None:
        return False
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def describe_status(status: int) -> str:
    if status < 0:
        return f"{status} (killed by {signal.Signals(-status).name})"
    return str(status)


def run(config: Config, programs: tuple[str, ...] = PROGRAMS) -> int:
    stopping = stop_event_on_signals()
    show_node_lines()
    logger.info("Starting the node's drivers: %s.", ", ".join(programs))
    children = [child for program in programs for child in supervised(program, config)]
    endpoint = MetricsEndpoint(metrics.node_endpoint_port(config.metrics_port), config.driver_postgres_url)
    try:
        exit_status = supervise(config, children, endpoint, stopping)
    except Exception as error:
        # The drivers get their parent-death signal as this process exits.
        announce_stop(f"the supervisor failed: {type(error).__name__}: {error}", "the drivers stop with it")
        raise
    killed = stop_all(children)
    endpoint.stop()
    stopped = f"{len(children)} drivers stopped" + (f", {', '.join(killed)} killed after a timeout" if killed else "")
    if exit_status == EXIT_API_UNAVAILABLE:
        announce_stop("a driver gave up waiting for its SQL API (its line above says why)", stopped)
    else:
        announce_stop(f"received {stopping.signal_name}", stopped)
    return exit_status


def supervised(program: str, config: Config) -> list[Child | InThread]:
    """The drivers that run `program`: one, but for a fetch API of several processes, one per process."""
    if program == "web" and config.webserver_processes > 1:
        return [
            Child(program, environment={WEBSERVER_SHARES_PORT_VARIABLE: "1"}) for _ in range(config.webserver_processes)
        ]
    target = in_thread_target(program, config)
    return [Child(program) if target is None else InThread(program, target=target)]


def in_thread_target(program: str, config: Config) -> Callable[[threading.Event], None] | None:
    """What runs `program` in a thread of the supervisor (THREAD_TARGETS), or None if it runs in a process.

    The chores consumer and the flusher run in a thread when each is to have
    one process (CHORES_BROKER_PROCESSES=1 and FLUSH_PROCESSES=1, the
    defaults); more are processes of their own.
    """
    target = THREAD_TARGETS.get(program)
    processes = {"chores": config.chores_broker_processes, "flusher": config.flush_processes}.get(program, 1)
    if target is None or processes != 1:
        return None
    return functools.partial(target, config)


def show_node_lines() -> None:
    """The ready and stop lines are the command's output: INFO, whatever the level of the other lines."""
    node_logger.setLevel(min(node_logger.getEffectiveLevel(), logging.INFO))


def supervise(config: Config, children: list[Supervised], endpoint: MetricsEndpoint, stopping: StopRequest) -> int:
    """Keep every driver and the metrics endpoint running until a stop signal (0) or a driver that gave
    up waiting for its SQL API (EXIT_API_UNAVAILABLE: restarting it cannot help); say once when the
    node is ready."""
    announced = False
    while not stopping.is_set():
        now = time.monotonic()
        for child in children:
            if child.check(now) == EXIT_API_UNAVAILABLE:
                return EXIT_API_UNAVAILABLE
        endpoint.check(now)
        if not announced and is_ready(config, children):
            announce_ready(config, children, endpoint)
            announced = True
        stopping.wait(POLL_SECONDS)
    return 0


def is_ready(config: Config, children: list[Supervised]) -> bool:
    """Every driver runs, and the fetch API (when it is one of them) accepts connections in each of
    its processes."""
    if not all(child.is_running() for child in children):
        return False
    web_processes = sum(child.program == "web" for child in children)
    if web_processes == 0:
        return True
    listeners = listening_sockets(config.webserver_port)
    # A connection succeeds once one process of several listens: the others are counted too.
    return (listeners is None or listeners >= web_processes) and accepts_connections(config.webserver_port)


def listening_sockets(port: int) -> int | None:
    """The IPv4 TCP sockets of this network namespace listening on `port`, one for each process
    that shares it (SO_REUSEPORT); None where /proc/net/tcp cannot be read (not Linux, a /proc
    that hides it): the connection probe alone decides then."""
    try:
        lines = TCP_SOCKETS_TABLE.read_text().splitlines()[1:]
    except OSError:
        return None
    # Each line: slot, local address as HEX_IP:HEX_PORT, remote address, state (0A is LISTEN), ...
    local_port = f":{port:04X}"
    return sum(1 for fields in map(str.split, lines) if fields[1].endswith(local_port) and fields[3] == TCP_LISTEN)


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=PORT_PROBE_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def announce_ready(config: Config, children: list[Supervised], endpoint: MetricsEndpoint) -> None:
    programs = [child.program for child in children]
    port = config.webserver_port if "web" in programs else None
    # The ledger does not wait for its metrics: a taken port is said here, and tried again meanwhile.
    metrics_port = endpoint.port if endpoint.server is not None else None
    realm = config.realm
    shard_realm = f"{realm.realm:#010x}/{realm.mask:#010x}"
    node_logger.info(
        "Node ready: %d drivers running (%s); fetch API on port %s; %s; consuming queue %s"
        " with routing key %s; shard realm %s (realm/mask of the hash space).",
        len(programs),
        ", ".join(programs),
        port if port is not None else "- (not run)",
        f"metrics on port {metrics_port}"
        if metrics_port is not None
        else f"metrics not served yet (port {endpoint.port}: {endpoint.last_error}; trying again)",
        config.protocol_broker_queue,
        config.protocol_broker_queue_routing_key,
        shard_realm,
        extra={
            "drivers": programs,
            "fetch_api_port": port,
            "metrics_port": metrics_port,
            "queue": config.protocol_broker_queue,
            "routing_key": config.protocol_broker_queue_routing_key,
            "shard_realm": shard_realm,
        },
    )


def announce_stop(reason: str, outcome: str) -> None:
    node_logger.info("Node stopped: %s; %s.", reason, outcome, extra={"stop_reason": reason})


def stop_all(children: list[Supervised]) -> list[str]:
    """Ask every driver to stop (SIGTERM to a process); after STOP_TIMEOUT_SECONDS, SIGKILL to what is
    left of their groups.

    Returns the drivers that had to be killed, or left running in their thread."""
    for child in children:
        child.request_stop()
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    killed = [child.program for child in children if child.finish_stop(deadline)]
    for child in children:
        child.clear_group(deadline)
    return killed
