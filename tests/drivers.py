"""Starting pyswpt commands as real subprocesses (or a consumer's loop in a thread of the test), and
waiting without sleeping blindly."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pyswpt import consuming, topology

POLL_INTERVAL_SECONDS = 0.05
# Where the kernel picks the local ports of outgoing connections (free_port stays below it).
EPHEMERAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PICKED_PORT = 10_000
PORT_PICKS = 100
STOP_DEADLINE_SECONDS = 30.0
ZOMBIE_STATE = "Z"
# What `pyswpt run all` logs for each driver it starts; one in a thread gives the supervisor's pid.
STARTED = re.compile(r"Started (\S+) (?:in a thread )?\(pid (\d+)\)")


def free_port() -> int:
    """A TCP port that nothing uses now and that no outgoing connection will take.

    A port the kernel hands out for bind(0) comes from its ephemeral range, the
    one it also gives the client end of every outgoing connection: before a
    node's web driver bound it, the node's own connections to PostgreSQL and
    RabbitMQ could take it, and the fetch API never started (seen in CI). So
    the port is picked below that range, where only an explicit bind can take it.
    """
    ephemeral_start = ephemeral_port_range_start()
    if ephemeral_start is None or ephemeral_start <= LOWEST_PICKED_PORT:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]
    for _ in range(PORT_PICKS):
        port = random.randrange(LOWEST_PICKED_PORT, ephemeral_start)
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port among {PORT_PICKS} picked below {ephemeral_start}")


def ephemeral_port_range_start() -> int | None:
    """The first port of the kernel's ephemeral range (Linux); None where it cannot be read."""
    try:
        return int(EPHEMERAL_PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


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


def start_consumer_thread(
    rabbitmq_url: str,
    database_url: str,
    queue: str,
    handler: consuming.BatchHandler,
    stopping: threading.Event,
    *,
    threads: int,
    prefetch_count: int,
) -> tuple[threading.Thread, list[BaseException]]:
    """pyswpt.consuming's loop on `queue`, in a thread of the test, until `stopping` is set: every
    batch goes to `handler` (the `threads` share it); what the loop raised is in the list."""
    settings = consuming.QueueSettings(
        broker_url=rabbitmq_url, queue=queue, prefetch_count=prefetch_count, prefetch_size=0, api_wait_seconds=300.0
    )
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            consuming.consume_in_threads(settings, database_url, threads, lambda: handler, stopping)
        except BaseException as error:  # noqa: BLE001 - the test looks at it
            failures.append(error)

    thread = threading.Thread(target=consume, name="test consumer")
    thread.start()
    return thread, failures


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
        process = subprocess.Popen([*pyswpt_command(), *args], env=environ, stdout=log_file, stderr=subprocess.STDOUT)
    started = Running(process, log_path)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def node_environment(database_url, rabbitmq_url):
    """Port of the fetch API and environment of a node with queues of its own, deleted afterwards."""
    queue = f"test_all_{uuid.uuid4().hex[:8]}"
    chores_queue = f"{queue}_chores"
    topology.subscribe(rabbitmq_url, queue, "#")
    topology.declare_chores_queue(rabbitmq_url, chores_queue)
    port = free_port()
    yield (
        port,
        driver_environment(
            database_url,
            rabbitmq_url,
            PROTOCOL_BROKER_QUEUE=queue,
            CHORES_BROKER_QUEUE=chores_queue,
            WEBSERVER_PORT=str(port),
            FETCH_API_URL=f"http://127.0.0.1:{port}",
            # Not the default port: another node on this machine may hold it.
            METRICS_PORT=str(free_port()),
        ),
    )
    with topology.open_channel(rabbitmq_url) as channel:
        for name in (queue, topology.dead_letter_queue_name(queue), chores_queue):
            channel.queue_delete(name)


def started_pids(log: str) -> dict[str, list[int]]:
    """The pids of each driver `pyswpt run all` started, in order, from its log."""
    pids: dict[str, list[int]] = {}
    for program, pid in STARTED.findall(log):
        pids.setdefault(program, []).append(int(pid))
    return pids


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/accounts/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def running_processes() -> dict[int, int]:
    """The parent pid of every process that has not exited (zombies are not running), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = process_stat(int(entry.name))
            if stat is not None and stat[0] != ZOMBIE_STATE:
                parents[int(entry.name)] = int(stat[1])
    return parents


def process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command (state, ppid, pgrp, ...); None once it is gone."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (command) state ppid pgrp ...": the command may contain spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()


def is_alive(pid: int) -> bool:
    """Whether the process has not exited; a zombie has, and only waits for its parent."""
    stat = process_stat(pid)
    return stat is not None and stat[0] != ZOMBIE_STATE


def children(pid: int) -> list[int]:
    return [child for child, parent in running_processes().items() if parent == pid]


def spawned_children(pid: int) -> list[int]:
    """Children started by multiprocessing's spawn (uvicorn's workers), not its resource tracker."""
    spawned = []
    for child in children(pid):
        with contextlib.suppress(FileNotFoundError):
            if b"multiprocessing.spawn" in Path(f"/proc/{child}/cmdline").read_bytes():
                spawned.append(child)
    return spawned


def descendants(pid: int) -> set[int]:
    """The running processes under `pid`: its children, theirs, and so on."""
    parents = running_processes()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found
