"""`pyswpt run all`: every driver of one node, restarted when it dies.

Each driver runs as its own `pyswpt run <name>` process, so that what runs
under the supervisor is exactly what the tests start one by one. A driver that
exits is started again after a backoff that grows while it keeps failing
quickly. SIGTERM or SIGINT stops every driver with SIGTERM — each finishes its
current batch, acks what committed and closes its connections — and kills
the ones still running after STOP_TIMEOUT_SECONDS.

The drivers write their metrics to the node's PROMETHEUS_MULTIPROC_DIR,
prepared by `pyswpt run` before this module is imported (pyswpt.cli.metrics_of),
and the supervisor serves them on METRICS_PORT from threads of its own
(MetricsEndpoint), with the restarts it counts: the same endpoint as `pyswpt
run metrics`, without one more interpreter and its libraries (about 45 MiB
resident) to keep. Threads are why no driver is prepared between fork and
exec (preexec_fn): each arms its parent-death signal itself.

A driver that gave up waiting for its SQL API (pyswpt.upgrades) is not
restarted: the database belongs to a release this node cannot work with, and
a restart would only wait out the same bound again while the node looked
healthy. The whole node stops the same way and exits with the driver's
status, so that the container shows the failure and its log ends with the
driver's line saying what to do.

Nothing of the tree outlives it. Each driver dies with the supervisor
(processes.die_with_supervisor), and its worker processes die with the driver.
Each driver also leads a process group of its own, which its workers inherit
and keep even once orphaned: the supervisor waits for a dead driver's group
to empty before starting it again, so that old workers never run beside their
replacements, and on the way out it kills every group that is not empty
after STOP_TIMEOUT_SECONDS. An operator can stop one driver with everything
it started likewise: `kill -- -PID`.

Whatever APP_LOG_LEVEL says, the supervisor logs one line at INFO when the
node is ready (every driver running and the fetch API accepting connections)
and one when it stopped, with why: an operator who starts a node sees that it
is up, where, and on which queue, without turning on the drivers' chatter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from wsgiref.simple_server import WSGIServer

from pyswpt import metrics
from pyswpt.config import Config
from pyswpt.processes import SUPERVISOR_PID_VARIABLE, StopRequest, stop_event_on_signals
from pyswpt.upgrades import EXIT_API_UNAVAILABLE

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
    # scan-accounts, scan-prepared-transfers and scan-registered-balance-changes, in one process.
    "scanners",
)
STOP_TIMEOUT_SECONDS = 25.0
# A driver that stayed up this long counts as started: its next failure restarts at once.
STARTED_AFTER_SECONDS = 30.0
RESTART_BACKOFF_SECONDS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
POLL_SECONDS = 0.5
# The fetch API is ready once a connection to its port succeeds within this time.
PORT_PROBE_TIMEOUT_SECONDS = 0.2
LOCALHOST = "127.0.0.1"


@dataclasses.dataclass
class Child:
    program: str
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float = 0.0
    # The process group of the driver's last run (its pid), and when to kill what still runs in it.
    group: int | None = None
    group_kill_at: float = 0.0

    def start(self) -> None:
        # Called from the main thread only: the parent-death signal follows the thread that forks.
        if self.group is not None:
            metrics.DRIVER_RESTARTS.labels(self.program).inc()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyswpt.cli", "run", self.program],
            process_group=0,
            env={**os.environ, SUPERVISOR_PID_VARIABLE: str(os.getpid())},
        )
        self.group = self.process.pid
        self.started_at = time.monotonic()
        logger.info("Started %s (pid %d).", self.program, self.process.pid)

    def check(self, now: float) -> int | None:
        """Restart the driver if it exited, after a backoff if it keeps failing fast.

        Returns EXIT_API_UNAVAILABLE, without a restart, when the driver exited with it.
        """
        if self.process is not None:
            status = self.process.poll()
            if status is None:
                return None
            ran_seconds = now - self.started_at
            if status == EXIT_API_UNAVAILABLE:
                logger.critical(
                    "%s (pid %d) found no SQL API it can use (see its line above); stopping the node.",
                    self.program,
                    self.process.pid,
                )
                self.process = None
                return status
            self.quick_failures = 0 if ran_seconds >= STARTED_AFTER_SECONDS else self.quick_failures + 1
            pause = backoff_seconds(self.quick_failures)
            logger.error(
                "%s (pid %d) exited with status %s after %.1f s; restarting in %.0f s.",
                self.program,
                self.process.pid,
                describe_status(status),
                ran_seconds,
                pause,
            )
            metrics.forget_process(self.process.pid)
            self.process = None
            self.restart_at = now + pause
            self.group_kill_at = now + STOP_TIMEOUT_SECONDS
        if now >= self.restart_at and self.group_is_gone(now):
            self.start()
        return None

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
    children = [Child(program) for program in programs]
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


def show_node_lines() -> None:
    """The ready and stop lines are the command's output: INFO, whatever the level of the other lines."""
    node_logger.setLevel(min(node_logger.getEffectiveLevel(), logging.INFO))


def supervise(config: Config, children: list[Child], endpoint: MetricsEndpoint, stopping: StopRequest) -> int:
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


def is_ready(config: Config, children: list[Child]) -> bool:
    """Every driver runs, and the fetch API (when it is one of them) accepts connections."""
    if not all(child.process is not None and child.process.poll() is None for child in children):
        return False
    return all(child.program != "web" or accepts_connections(config.webserver_port) for child in children)


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=PORT_PROBE_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def announce_ready(config: Config, children: list[Child], endpoint: MetricsEndpoint) -> None:
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


def stop_all(children: list[Child]) -> list[str]:
    """SIGTERM to every driver; after STOP_TIMEOUT_SECONDS, SIGKILL to what is left of their groups.

    Returns the drivers that had to be killed."""
    killed = []
    running = [child for child in children if child.process is not None and child.process.poll() is None]
    for child in running:
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for child in running:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) did not stop in time; killing it.", child.program, child.process.pid)
            killed.append(child.program)
            child.process.kill()
            child.process.wait()
    # The drivers stop their own workers, but a driver that was killed left its workers behind.
    for child in children:
        while group_is_running(child.group) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        if group_is_running(child.group):
            child.kill_group()
    return killed
