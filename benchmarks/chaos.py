"""Chaos run: transfers keep flowing while processes die, connections drop and peers send poison.

Not a test (tests/test_chaos.py runs a short variant). A fresh database and a
RabbitMQ vhost of its own; `pyswpt configure` and `pyswpt run all`; one debtor
whose accounts are funded by issuing; then C simulated coordinators run a
closed loop of PrepareTransfer → PreparedTransfer → FinalizeTransfer →
FinalizedTransfer until N transfers are done, resending what goes
unanswered. Meanwhile a fault thread SIGKILLs processes of the node's tree
and the whole node (then starts `run all` again, as a container's restart
would), terminates its database backends and closes its broker connections
(and with --crash-postgres crashes the PostgreSQL server), and poison
messages of every kind are mixed into the queue. At the end it checks:

* every request was answered, and at most one distinct way (duplicates of the
  same message are allowed: delivery is at least once);
* every account's principal is what the coordinators' own books say, and the
  debtor's principals sum to zero;
* every poison message is parked with its reason, and nothing else is;
* `pyswpt audit` passes;
* after `run all` stopped, no process of its tree is left.

    PYSWPT_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
    PYSWPT_TEST_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2F \\
    .venv/bin/python benchmarks/chaos.py --transfers 10000

The run makes a vhost of its own, like a test session (tests/vhosts.py); it
closes the node's broker connections with rabbitmqctl, so it runs on the
broker's machine. --crash-postgres SIGKILLs a backend of the node, so that
the postmaster restarts every backend of the server and recovers from the WAL
on disk: the workers' and flusher's asynchronous commits not yet written are
undone (pyswpt.db). It needs the database server's machine and the right to
signal its processes, and it disturbs every other user of the server.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pika
import psycopg

from pyswpt import config as settings
from pyswpt.drivers import supervisor
from pyswpt.drivers.supervisor import PROGRAMS
from pyswpt.sharding import Realm, u64_string

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import vhosts  # noqa: E402  (tests/vhosts.py, shared with the test sessions)
from conftest import new_database  # noqa: E402
from drivers import STARTED, free_port, pyswpt_command  # noqa: E402
from peers import OUTBOX_TABLES, WORK_TABLES  # noqa: E402

UTC = dt.UTC
JSON = "application/json"
T_INFINITY = "9999-12-31T23:59:59+00:00"
REALM = "0.#"
# A pair of the other half of the hash space: the node must park it as foreign.
FOREIGN_REALM = "1.#"
FUND_AMOUNT = 10**12
ROOT_NEGLIGIBLE_AMOUNT = 1e30
MAX_COMMIT_DELAY_SECONDS = 3600
# A request unanswered this long is sent again (restarts back off up to 30 s).
RESEND_AFTER_SECONDS = 40.0
POLL_SECONDS = 0.02
COORDINATOR_CONNECTION_NAME = "pyswpt chaos coordinators"
# The magic values on which the run's fault triggers act.
TIMEOUT_CREDITOR_OFFSET = 7
REFUSED_CHANGE_ID = 777_777
NODE_SETTINGS = {
    "PROTOCOL_BROKER_QUEUE_ROUTING_KEY": REALM,
    "PROTOCOL_BROKER_PROCESSES": "2",
    "PROTOCOL_BROKER_PREFETCH_COUNT": "50",
    "PROTOCOL_BROKER_THREADS": "3",
    "FLUSH_PERIOD": "0.5",
    "APP_PROCESS_TRANSFER_REQUESTS_WAIT": "0.5",
    "APP_PROCESS_FINALIZATION_REQUESTS_WAIT": "0.5",
    "APP_PROCESS_BALANCE_CHANGES_WAIT": "0.5",
    "PROCESS_TRANSFER_REQUESTS_THREADS": "4",
    "PROCESS_FINALIZATION_REQUESTS_THREADS": "4",
    "PROCESS_BALANCE_CHANGES_THREADS": "4",
    # Scanner passes of a few seconds, so the scanners meet every row during the run.
    "APP_ACCOUNTS_SCAN_HOURS": "0.002",
    "APP_PREPARED_TRANSFERS_SCAN_DAYS": "0.0001",
    "APP_REGISTERED_BALANCE_CHANGES_SCAN_DAYS": "0.0001",
    "APP_LOG_LEVEL": "info",
}
# A fault whose target is not running is tried again this often in its round.
MAX_TRIES_PER_FAULT = 10
NODE_KILLED = "SIGKILL the node, then run all again"  # the fault's line in the report
# The fields by which an answer names its request (PreparedTransfer, RejectedTransfer...).
ANSWER_KEY = ("coordinator_type", "coordinator_id", "coordinator_request_id")
NODE_KILL_SECONDS = 30.0
# The supervisor's first line at each start of the node (pyswpt.drivers.supervisor.run).
NODE_STARTING = "Starting the node's drivers"


@dataclasses.dataclass(frozen=True)
class Settings:
    transfers: int = 10_000
    concurrency: int = 40
    accounts: int = 50
    fault_interval_seconds: float = 3.0
    poison_every: int = 100  # one poison message per this many transfers started
    min_fault_rounds: int = 1  # transfers go on until every kind of fault was injected this often
    crash_postgres: bool = False
    # Two: the flusher is a process with forked workers, killed like the other drivers. One (the
    # default of `run all`): a thread of the supervisor, killed with the whole node.
    flush_processes: int = 2
    deadline_seconds: float = 1800.0

    def node_settings(self) -> dict[str, str]:
        return {**NODE_SETTINGS, "FLUSH_PROCESSES": str(self.flush_processes)}


def drivers_in_processes(node_settings: dict[str, str]) -> tuple[str, ...]:
    """The drivers that `run all` runs in processes of their own, each killed once a round. The
    others (the chores consumer with one process, the scanners, the flusher with one) run in
    threads of the supervisor: the backend terminations, the closed broker connections and the
    node's own kill reach them."""
    config = settings.load(node_settings)
    return tuple(program for program in PROGRAMS if supervisor.in_thread_target(program, config) is None)


# --- servers ------------------------------------------------------------------------------


def rabbitmqctl(*args: str) -> str:
    """Closing chosen connections has no AMQP equivalent: the run talks to the local broker."""
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True).stdout


# --- the node -----------------------------------------------------------------------------


@dataclasses.dataclass
class Node:
    database_url: str
    broker_url: str
    vhost: str
    queue: str
    environ: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def configure(self) -> None:
        subprocess.run([*pyswpt_command(), "configure"], env=self.environ, check=True, capture_output=True)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*pyswpt_command(), "run", "all"],
                env=self.environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tree_pids(self) -> dict[int, str]:
        """Every live process of the node's session, with its command line."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            state, session = fields[0], int(fields[3])
            if session == self.process.pid and state != "Z":
                found[int(entry.name)] = cmdline.strip()
        return found


def node_environment(
    database_url: str, broker_url: str, queue: str, port: int, settings: dict[str, str] = NODE_SETTINGS
) -> dict[str, str]:
    return {
        **os.environ,
        **settings,
        "POSTGRES_URL": database_url,
        "PROTOCOL_BROKER_URL": broker_url,
        "CHORES_BROKER_URL": broker_url,
        "PROTOCOL_BROKER_QUEUE": queue,
        "CHORES_BROKER_QUEUE": f"{queue}_chores",
        "WEBSERVER_PORT": str(port),
        "FETCH_API_URL": f"http://127.0.0.1:{port}",
        "SETUP_RABBITMQ_BINDINGS": "yes",
        # Not the default port: another node on this machine may hold it.
        "METRICS_PORT": str(free_port()),
    }


# --- faults -------------------------------------------------------------------------------


class Faults(threading.Thread):
    """Faults one after another, each kind once a round in random order.

    A round SIGKILLs each driver of `run all` in a process of its own
    (`drivers`) and one worker forked by a driver, terminates a database
    backend, closes the node's broker connections and SIGKILLs the whole node
    before starting it again; with `crash_postgres` it also crashes the
    database server.
    """

    def __init__(self, node: Node, interval_seconds: float, drivers: tuple[str, ...], crash_postgres: bool = False):
        super().__init__(name="faults", daemon=True)
        self.node = node
        self.drivers = drivers
        self.interval_seconds = interval_seconds
        self.crash_postgres = crash_postgres
        self.stopping = threading.Event()
        self.rounds = 0
        self.injected: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        actions = [functools.partial(self.kill_driver, program) for program in self.drivers]
        actions += [self.kill_a_forked_worker, self.terminate_a_backend, self.close_broker_connections]
        actions.append(self.kill_and_restart_the_node)
        if self.crash_postgres:
            actions.append(self.kill_a_backend)
        while not self.stopping.is_set():
            due = random.sample(actions, len(actions))
            # A target that is not running now (a driver being restarted) is tried
            # again later in the round, so that a round injects every kind of fault.
            for _attempt in range(MAX_TRIES_PER_FAULT):
                due = [action for action in due if not self.inject(action)]
                if not due or self.stopping.is_set():
                    break
            self.rounds += 1

    def inject(self, action: Callable[[], bool]) -> bool:
        """Wait, then try `action`; True if the fault was injected, False if it is to be tried again."""
        if self.stopping.wait(self.interval_seconds * random.uniform(0.5, 1.5)):
            return True
        try:
            return action()
        except (OSError, subprocess.CalledProcessError, psycopg.Error) as error:
            self.injected[f"fault not injected ({type(error).__name__})"] += 1
            return True

    def children(self) -> dict[int, tuple[int, str]]:
        """The node's processes but `run all`: pid -> (parent pid, command line)."""
        tree = {}
        for pid, cmdline in self.node.tree_pids().items():
            if pid != self.node.process.pid:
                tree[pid] = (parent_of(pid), cmdline)
        return tree

    def kill_driver(self, program: str) -> bool:
        supervisor = self.node.process.pid
        for pid, (parent, cmdline) in self.children().items():
            if parent == supervisor and cmdline.split()[-1:] == [program]:
                os.kill(pid, signal.SIGKILL)
                self.injected[f"SIGKILL {program}"] += 1
                return True
        return False

    def kill_a_forked_worker(self) -> bool:
        supervisor = self.node.process.pid
        forked = [pid for pid, (parent, _cmdline) in self.children().items() if parent != supervisor]
        if not forked:
            return False
        pid = random.choice(forked)
        program = self.children().get(pid, (0, "?"))[1].split()[-1]
        os.kill(pid, signal.SIGKILL)
        self.injected[f"SIGKILL a worker forked by {program}"] += 1
        return True

    def kill_and_restart_the_node(self) -> bool:
        """What a crash of the node's container and its restart do: every process of `run all` dies
        at once, by SIGKILL, then `run all` starts again.

        Each process is stopped (SIGSTOP) first, the supervisor first: a stopped
        process starts no other, cannot begin a graceful stop when its parent
        dies (the drivers' parent-death signal is SIGTERM), and keeps its pid
        until the SIGKILL.
        """
        deadline = time.monotonic() + NODE_KILL_SECONDS
        stopped: set[int] = set()
        os.kill(self.node.process.pid, signal.SIGSTOP)
        while running := set(self.node.tree_pids()) - stopped:
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of the node still running: {sorted(running)}")
            for pid in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stopped |= running
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.node.tree_pids():
            if time.monotonic() > deadline:
                raise TimeoutError("processes of the node outlived their SIGKILL")
            self.stopping.wait(POLL_SECONDS)
        self.node.process.wait()
        self.node.start()
        self.injected[NODE_KILLED] += 1
        return True

    def terminate_a_backend(self) -> bool:
        pid = self.a_backend_of_the_node()
        if pid is None:
            return False
        with psycopg.connect(self.node.database_url, autocommit=True) as conn:
            terminated = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        self.injected["database backend terminated"] += terminated
        return terminated

    def kill_a_backend(self) -> bool:
        """A crash of the server: after a backend dies by SIGKILL, the postmaster restarts them all."""
        pid = self.a_backend_of_the_node()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        self.injected["PostgreSQL crashed (a backend SIGKILLed)"] += 1
        return True

    def a_backend_of_the_node(self) -> int | None:
        with psycopg.connect(self.node.database_url, autocommit=True) as conn:
            row = conn.execute(
                """
                SELECT pid FROM pg_stat_activity
                WHERE datname = current_database() AND application_name LIKE 'pyswpt%'
                ORDER BY random()
                LIMIT 1
                """
            ).fetchone()
        return row[0] if row else None

    def close_broker_connections(self) -> bool:
        """Close the node's broker connections (not the coordinators')."""
        # list_connections has no vhost filter (it ignores -p): it lists every connection of
        # the broker, and those of other vhosts — other test sessions' — must stay open.
        listing = rabbitmqctl("list_connections", "pid", "vhost", "client_properties")
        closed = 0
        for line in listing.splitlines():
            if COORDINATOR_CONNECTION_NAME in line or not line.startswith("<"):
                continue
            pid, vhost = line.split("\t", 2)[:2]
            if vhost != self.node.vhost:
                continue
            subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "chaos"], capture_output=True)
            closed += 1
        self.injected["broker connection closed"] += closed
        return closed > 0


def parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])


# --- poison -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Poison:
    kind: str
    reason_code: str  # what the parked row must say
    source_kind: str  # queue (parked by a consumer) or outbox (parked by the flusher)


POISON = (
    Poison("invalid JSON", "invalid", "queue"),
    Poison("unknown type", "invalid", "queue"),
    Poison("wrong content type", "invalid", "queue"),
    Poison("field out of range", "invalid", "queue"),
    Poison("date-time past year 9999 in UTC", "invalid", "queue"),
    Poison("NUL in the type property", "invalid", "queue"),
    Poison("account of another shard", "foreign_shard", "queue"),
    Poison("refused by the database", "refused", "queue"),
    Poison("statement timeout on every attempt", "repeated_failure", "queue"),
    Poison("unroutable answer", "unroutable", "outbox"),
)


# --- coordinators -------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    request_id: int
    sender: int
    recipient: int
    amount: int
    coordinator_type: str
    coordinator_id: int
    state: str = "preparing"  # preparing, finalizing, committed, rejected
    transfer_id: int | None = None
    sent_at: float = 0.0
    answers: set[str] = dataclasses.field(default_factory=set)
    extra_transfer_ids: set[int] = dataclasses.field(default_factory=set)
    transfer_note: str = ""

    @property
    def done(self) -> bool:
        return self.state in ("committed", "rejected")


def wire_now() -> str:
    return dt.datetime.now(UTC).isoformat()


class Coordinators:
    """Simulated coordinators: the closed loop, the resends, and the books of what was committed."""

    # Every publish waits for the broker's confirm, so that one it refused cannot go unnoticed.
    confirm_delivery = True

    def __init__(self, broker_url: str, queue: str, debtor_id: int, realm: Realm):
        self.broker_url = broker_url
        self.queue = queue
        self.debtor_id = debtor_id
        self.realm = realm
        self.requests: dict[tuple[int, int], Request] = {}
        self.next_request_id = 1
        self.counts: collections.Counter[str] = collections.Counter()
        self.poisoned: list[tuple[Poison, bytes | None]] = []
        self.inbox = f"chaos_coordinators_{uuid.uuid4().hex[:8]}"
        self.connect()

    def connect(self) -> None:
        parameters = pika.URLParameters(self.broker_url)
        parameters.client_properties = {"connection_name": COORDINATOR_CONNECTION_NAME}
        self.connection = pika.BlockingConnection(parameters)
        self.channel = self.connection.channel()
        if self.confirm_delivery:
            self.channel.confirm_delivery()
        self.channel.queue_declare(self.inbox, durable=True)
        for exchange in ("to_creditors", "to_debtors"):
            self.channel.queue_bind(self.inbox, exchange, "#")

    # -- sending

    def publish(self, message_type: str | None, body: bytes, *, content_type: str = JSON) -> None:
        """Straight into the node's queue, as the broker would deliver it from a peer."""
        properties = pika.BasicProperties(content_type=content_type, type=message_type, delivery_mode=2)
        self.channel.basic_publish("", self.queue, body, properties)

    def send(self, fields: dict) -> None:
        self.publish(fields["type"], json.dumps(fields).encode())

    def configure(self, creditor_id: int, negligible_amount: float = 0.0, config_data: str = "") -> None:
        self.send(
            {
                "type": "ConfigureAccount",
                "debtor_id": self.debtor_id,
                "creditor_id": creditor_id,
                "negligible_amount": negligible_amount,
                "config_data": config_data,
                "config_flags": 0,
                "seqnum": 1,
                "ts": wire_now(),
            }
        )

    def start_request(self, sender: int, recipient: int, amount: int, coordinator_type: str = "direct") -> Request:
        coordinator_id = self.debtor_id if coordinator_type == "issuing" else sender
        request = Request(self.next_request_id, sender, recipient, amount, coordinator_type, coordinator_id)
        self.next_request_id += 1
        self.requests[(coordinator_id, request.request_id)] = request
        self.send_prepare(request)
        return request

    def send_prepare(self, request: Request) -> None:
        request.sent_at = time.monotonic()
        self.send(
            {
                "type": "PrepareTransfer",
                "debtor_id": self.debtor_id,
                "creditor_id": request.sender,
                "coordinator_type": request.coordinator_type,
                "coordinator_id": request.coordinator_id,
                "coordinator_request_id": request.request_id,
                "min_locked_amount": request.amount,
                "max_locked_amount": request.amount,
                "recipient": u64_string(request.recipient),
                "final_interest_rate_ts": T_INFINITY,
                "max_commit_delay": MAX_COMMIT_DELAY_SECONDS,
                "ts": wire_now(),
            }
        )

    def send_finalize(self, request: Request, transfer_id: int, committed_amount: int) -> None:
        request.sent_at = time.monotonic()
        self.send(
            {
                "type": "FinalizeTransfer",
                "debtor_id": self.debtor_id,
                "creditor_id": request.sender,
                "transfer_id": transfer_id,
                "coordinator_type": request.coordinator_type,
                "coordinator_id": request.coordinator_id,
                "coordinator_request_id": request.request_id,
                "committed_amount": committed_amount,
                "transfer_note_format": "",
                "transfer_note": request.transfer_note,
                "ts": wire_now(),
            }
        )

    def resend_overdue(self) -> None:
        now = time.monotonic()
        for request in self.requests.values():
            if request.done or now - request.sent_at < RESEND_AFTER_SECONDS:
                continue
            self.counts[f"resent {request.state}"] += 1
            if request.state == "preparing":
                self.send_prepare(request)
            else:
                self.send_finalize(request, request.transfer_id, request.amount)

    # -- receiving

    def receive(self, seconds: float) -> None:
        """Handle what arrives for `seconds` (the faults never close this connection)."""
        deadline = time.monotonic() + seconds
        while True:
            method, _properties, body = self.channel.basic_get(self.inbox, auto_ack=True)
            if method is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.connection.sleep(min(POLL_SECONDS, remaining))
                continue
            self.handle(json.loads(body), body)

    def handle(self, fields: dict, body: bytes) -> None:
        message_type = fields["type"]
        if message_type not in ("PreparedTransfer", "RejectedTransfer", "FinalizedTransfer"):
            self.counts[f"{message_type} received"] += 1
            return
        request = self.requests.get((fields["coordinator_id"], fields["coordinator_request_id"]))
        if request is None:
            self.counts[f"{message_type} for no request of ours"] += 1
            return
        if message_type == "PreparedTransfer":
            self.on_prepared(request, fields, body)
        elif message_type == "RejectedTransfer":
            request.answers.add(f"rejected {fields['status_code']}")
            if request.state == "preparing":
                request.state = "rejected"
        elif fields["transfer_id"] == request.transfer_id:
            request.answers.add(f"finalized {fields['status_code']} {fields['committed_amount']}")
            if request.state == "finalizing":
                request.state = "committed"

    def on_prepared(self, request: Request, fields: dict, body: bytes) -> None:
        transfer_id = fields["transfer_id"]
        if request.state == "preparing":
            request.transfer_id = transfer_id
            request.state = "finalizing"
            request.answers.add(f"prepared {transfer_id}")
            self.send_finalize(request, transfer_id, request.amount)
        elif transfer_id != request.transfer_id and transfer_id not in request.extra_transfer_ids:
            # A request delivered again after it was finalized prepares another
            # transfer (as in the reference); a coordinator dismisses it.
            request.extra_transfer_ids.add(transfer_id)
            self.send_finalize(request, transfer_id, 0)

    # -- poison

    def poison(self, kind: Poison, foreign_pair: tuple[int, int], timeout_creditor: int) -> None:
        good = {
            "type": "ConfigureAccount",
            "debtor_id": self.debtor_id,
            "creditor_id": timeout_creditor,
            "negligible_amount": 0.0,
            "config_data": "",
            "config_flags": 0,
            "seqnum": random.randint(1, 2**31 - 1),
            "ts": wire_now(),
        }
        body: bytes | None = None
        if kind.kind == "invalid JSON":
            body = b'{"type": "ConfigureAccount", ' + uuid.uuid4().hex.encode()
            self.publish("ConfigureAccount", body)
        elif kind.kind == "unknown type":
            body = json.dumps({**good, "type": "ConfigureAccounts", "seqnum": good["seqnum"]}).encode()
            self.publish("ConfigureAccounts", body)
        elif kind.kind == "wrong content type":
            body = json.dumps(good).encode()
            self.publish("ConfigureAccount", body, content_type="text/plain")
        elif kind.kind == "field out of range":
            body = json.dumps({**good, "config_flags": 2**31}).encode()
            self.publish("ConfigureAccount", body)
        elif kind.kind == "date-time past year 9999 in UTC":
            body = json.dumps({**good, "ts": "9999-12-31T23:59:59-23:59"}).encode()
            self.publish("ConfigureAccount", body)
        elif kind.kind == "NUL in the type property":
            body = json.dumps(good).encode()
            self.publish("Configure\x00Account", body)
        elif kind.kind == "account of another shard":
            body = json.dumps({**good, "debtor_id": foreign_pair[0], "creditor_id": foreign_pair[1]}).encode()
            self.publish("ConfigureAccount", body)
        elif kind.kind == "refused by the database":
            fields = {
                "type": "PendingBalanceChange",
                "debtor_id": self.debtor_id,
                "creditor_id": timeout_creditor,
                "change_id": REFUSED_CHANGE_ID + len(self.poisoned),
                "coordinator_type": "direct",
                "transfer_note_format": "",
                "transfer_note": "",
                "committed_at": wire_now(),
                "principal_delta": 1,
                "other_creditor_id": 1,
            }
            body = json.dumps(fields).encode()
            self.publish("PendingBalanceChange", body)
        elif kind.kind == "statement timeout on every attempt":
            body = json.dumps(good).encode()
            self.publish("ConfigureAccount", body)
        elif kind.kind == "unroutable answer":
            # A valid request from an unbound coordinator type to an unknown
            # recipient: the RejectedTransfer has nowhere to go.
            request = self.start_request(timeout_creditor, 1, 1, coordinator_type="zzz")
            request.state = "rejected"  # no answer can reach us
            # Not a message of ours to find parked, but the request its parked answer names.
            body = json.dumps(dict(zip(ANSWER_KEY, request_key(request), strict=True))).encode()
        self.poisoned.append((kind, body))
        self.counts[f"poison: {kind.kind}"] += 1


# --- the run ------------------------------------------------------------------------------


def pick_creditors(realm: Realm, debtor_id: int, count: int) -> list[int]:
    creditors: list[int] = []
    while len(creditors) < count:
        creditor = random.randint(1, 2**62)
        if realm.owns(debtor_id, creditor):
            creditors.append(creditor)
    return creditors


def pick_debtor(realm: Realm) -> int:
    while not realm.owns(debtor_id := random.randint(1, 2**62), 0):
        pass
    return debtor_id


def install_faults(database_url: str, debtor_id: int, timeout_creditor: int) -> None:
    """Triggers that make the database answer as real faults would, for the run's magic values."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"""
            CREATE FUNCTION public.chaos_timeout() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.debtor_id = {debtor_id} AND NEW.creditor_id = {timeout_creditor} THEN
                    RAISE EXCEPTION 'canceling statement due to statement timeout'
                        USING ERRCODE = 'query_canceled';
                END IF;
                RETURN NEW;
            END;
            $$;
            CREATE TRIGGER chaos_timeout BEFORE INSERT OR UPDATE ON pyswpt.account
                FOR EACH ROW EXECUTE FUNCTION public.chaos_timeout();
            CREATE FUNCTION public.chaos_refusal() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.change_id >= {REFUSED_CHANGE_ID} AND NEW.debtor_id = {debtor_id} THEN
                    RAISE EXCEPTION 'refused by the chaos run' USING ERRCODE = 'check_violation';
                END IF;
                RETURN NEW;
            END;
            $$;
            CREATE TRIGGER chaos_refusal BEFORE INSERT ON pyswpt.registered_balance_change
                FOR EACH ROW EXECUTE FUNCTION public.chaos_refusal();
            """
        )


def queued_rows(database_url: str, tables: tuple[str, ...]) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return sum(conn.execute(f"SELECT count(*) FROM pyswpt.{table}").fetchone()[0] for table in tables)


def wait_until(condition: Callable[[], bool], what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {seconds:.0f} s waiting for {what}")
        time.sleep(0.2)


@dataclasses.dataclass
class Report:
    injected: dict[str, int]
    verified: list[tuple[str, str, str, bool]]  # check, expected, actual, ok
    transfers_per_second: float
    duration_seconds: float

    @property
    def ok(self) -> bool:
        return all(ok for *_row, ok in self.verified)

    def table(self) -> str:
        lines = ["| injected | count |", "|---|---|"]
        lines += [f"| {what} | {count} |" for what, count in sorted(self.injected.items())]
        lines += ["", "| verified | expected | actual | |", "|---|---|---|---|"]
        lines += [
            f"| {check} | {expected} | {actual} | {'ok' if ok else 'FAILED'} |"
            for check, expected, actual, ok in self.verified
        ]
        lines += ["", f"{self.transfers_per_second:.1f} transfers/s over {self.duration_seconds:.0f} s"]
        return "\n".join(lines)


def run_chaos(postgres_server_url: str, rabbitmq_server_url: str, settings: Settings, log_dir: Path) -> Report:
    realm = Realm.from_binding_key(REALM)
    admin = vhosts.vhost_admin_for(rabbitmq_server_url, os.environ.get(vhosts.MANAGEMENT_URL_VARIABLE))
    with (
        new_database(postgres_server_url, "pyswpt_chaos") as database_url,
        vhosts.own_vhost(admin, rabbitmq_server_url, "pyswpt_chaos") as broker_url,
    ):
        vhost = vhosts.vhost_of(broker_url)
        queue = f"chaos_{uuid.uuid4().hex[:8]}"
        node = Node(
            database_url,
            broker_url,
            vhost,
            queue,
            node_environment(database_url, broker_url, queue, free_port(), settings.node_settings()),
            log_dir / f"{queue}.log",
        )
        node.configure()
        debtor_id = pick_debtor(realm)
        creditors = pick_creditors(realm, debtor_id, settings.accounts + 1)
        timeout_creditor, creditors = creditors[0], creditors[1:]
        foreign_realm = Realm.from_binding_key(FOREIGN_REALM)
        foreign_pair = (debtor_id, pick_creditors(foreign_realm, debtor_id, 1)[0])
        install_faults(database_url, debtor_id, timeout_creditor)
        node.start()
        try:
            return drive(node, settings, debtor_id, creditors, foreign_pair, timeout_creditor)
        finally:
            if node.process.poll() is None:
                node.stop()


def drive(
    node: Node,
    settings: Settings,
    debtor_id: int,
    creditors: list[int],
    foreign_pair: tuple[int, int],
    timeout_creditor: int,
) -> Report:
    coordinators = Coordinators(node.broker_url, node.queue, debtor_id, Realm.from_binding_key(REALM))
    deadline = time.monotonic() + settings.deadline_seconds
    funding = open_and_fund_accounts(coordinators, node.database_url, creditors, deadline)

    drivers = drivers_in_processes(settings.node_settings())
    faults = Faults(node, settings.fault_interval_seconds, drivers, settings.crash_postgres)
    faults.start()
    started_at = time.monotonic()
    transfers: list[Request] = []
    poison_kinds = itertools.cycle(POISON)
    try:
        while more_needed(transfers, faults, settings) or not all(request.done for request in transfers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(r.done for r in transfers)} of {len(transfers)} transfers done")
            in_flight = sum(not request.done for request in transfers)
            while in_flight < settings.concurrency and more_needed(transfers, faults, settings):
                sender, recipient = random.sample(creditors, 2)
                transfers.append(coordinators.start_request(sender, recipient, random.randint(1, 1000)))
                in_flight += 1
                if len(transfers) % settings.poison_every == 0:
                    coordinators.poison(next(poison_kinds), foreign_pair, timeout_creditor)
            coordinators.receive(0.05)
            coordinators.resend_overdue()
    finally:
        faults.stopping.set()
        faults.join()
    duration = time.monotonic() - started_at

    wait_until_quiet(coordinators, node.database_url)
    verified = verify(node, coordinators, debtor_id, creditors, funding, transfers)
    coordinators.connection.close()
    stop_status = node.stop()
    left = node.tree_pids()
    verified.append(("run all exit status after SIGTERM", "0", str(stop_status), stop_status == 0))
    verified.append(("processes of the node left after it stopped", "0", str(len(left)), not left))
    injected = dict(faults.injected) | {k: v for k, v in coordinators.counts.items() if k.startswith("poison")}
    injected |= restarts(node.log())
    committed = sum(request.state == "committed" for request in transfers)
    return Report(injected, verified, committed / duration, duration)


def open_and_fund_accounts(
    coordinators: Coordinators, database_url: str, creditors: list[int], deadline: float
) -> list[Request]:
    """The debtor's root account (no negligible limit on issuing) and the creditors' accounts,
    each funded with FUND_AMOUNT by an issuing transfer; returns the funding requests."""
    coordinators.configure(0, negligible_amount=ROOT_NEGLIGIBLE_AMOUNT)
    for creditor in creditors:
        coordinators.configure(creditor)
    debtor_id = coordinators.debtor_id
    wait_until(lambda: accounts_present(database_url, debtor_id) >= len(creditors) + 1, "the accounts", 120)
    funding = [coordinators.start_request(0, creditor, FUND_AMOUNT, "issuing") for creditor in creditors]
    while not all(request.done for request in funding):
        coordinators.receive(0.2)
        coordinators.resend_overdue()
        if time.monotonic() > deadline:
            raise TimeoutError("funding did not finish")
    return funding


def wait_until_quiet(coordinators: Coordinators, database_url: str) -> None:
    """Every queue, work table and outbox empty, every poison message of the queue parked,
    then nothing moves any more."""
    wait_until(lambda: queue_is_empty(coordinators, coordinators.queue), "the SMP queue to empty", 300)
    wait_until(lambda: queued_rows(database_url, WORK_TABLES + OUTBOX_TABLES) == 0, "the node to settle", 300)

    # A message that failed on purpose waits for its next attempt unacknowledged (the
    # consumer's requeue pause), which the queue's count of ready messages leaves out.
    # The consumer parks a message that keeps failing only while other messages pass
    # (pyswpt.applying): on a quiet queue, say after a consumer restarted late in the
    # run, it would be tried again for ever. So messages keep passing meanwhile: the
    # root account's configuration again, which changes nothing.
    def parked_while_others_pass() -> bool:
        coordinators.configure(0, negligible_amount=ROOT_NEGLIGIBLE_AMOUNT)
        return queue_poison_parked(coordinators, database_url)

    with contextlib.suppress(TimeoutError):  # verify_parked reports what is still missing
        wait_until(parked_while_others_pass, "the poison messages to park", 120)
    coordinators.receive(2.0)


def queue_poison_parked(coordinators: Coordinators, database_url: str) -> bool:
    """As many messages parked by the consumer as poison messages were sent to the queue."""
    sent = sum(kind.source_kind == "queue" for kind, _body in coordinators.poisoned)
    with psycopg.connect(database_url, autocommit=True) as conn:
        parked = conn.execute("SELECT count(*) FROM pyswpt.parked_message WHERE source_kind = 'queue'").fetchone()[0]
    return parked >= sent


def more_needed(transfers: list[Request], faults: Faults, settings: Settings) -> bool:
    return len(transfers) < settings.transfers or faults.rounds < settings.min_fault_rounds


def answered_one_way(request: Request) -> bool:
    """One distinct answer per stage; identical duplicates (at-least-once delivery) count once."""
    if request.state == "committed":
        prepared = [a for a in request.answers if a.startswith("prepared ")]
        return len(prepared) == 1 and request.answers - set(prepared) == {f"finalized OK {request.amount}"}
    return request.state == "rejected" and len(request.answers) == 1


def accounts_present(database_url: str, debtor_id: int) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pyswpt.account WHERE debtor_id = %s", (debtor_id,)).fetchone()[0]


def queue_is_empty(coordinators: Coordinators, queue: str) -> bool:
    coordinators.receive(0.5)
    return coordinators.channel.queue_declare(queue, passive=True).method.message_count == 0


def restarts(log: str) -> dict[str, int]:
    """How often `run all` started each driver again, counted within each start of the node."""
    counts: collections.Counter[str] = collections.Counter()
    for node_run in log.split(NODE_STARTING)[1:]:
        started = collections.Counter(program for program, _pid in STARTED.findall(node_run))
        counts.update({program: count - 1 for program, count in started.items() if count > 1})
    return {f"restarts by run all: {program}": count for program, count in counts.items()}


def verify(
    node: Node,
    coordinators: Coordinators,
    debtor_id: int,
    creditors: list[int],
    funding: list[Request],
    transfers: list[Request],
) -> list[tuple[str, str, str, bool]]:
    rows: list[tuple[str, str, str, bool]] = []
    answered_once = [r for r in transfers if answered_one_way(r)]
    rows.append(
        (
            "requests answered one way only",
            str(len(transfers)),
            str(len(answered_once)),
            len(answered_once) == len(transfers),
        )
    )
    committed = [r for r in transfers if r.state == "committed"]
    rejected = [r for r in transfers if r.state == "rejected"]
    rows.append(
        (
            "transfers committed + rejected",
            str(len(transfers)),
            f"{len(committed)} + {len(rejected)}",
            len(committed) + len(rejected) == len(transfers),
        )
    )
    for answer, count in sorted(collections.Counter(a for r in rejected for a in r.answers).items()):
        rows.append((f"transfers {answer}", "any", str(count), True))
    extra = sum(len(r.extra_transfer_ids) for r in transfers)
    rows.append(("extra transfers prepared by a late redelivery (dismissed)", "any", str(extra), True))

    expected = collections.Counter()
    for request in funding + committed:
        expected[request.sender] -= request.amount
        expected[request.recipient] += request.amount
    with psycopg.connect(node.database_url, autocommit=True) as conn:
        principals = dict(
            conn.execute(
                "SELECT creditor_id, principal FROM pyswpt.account WHERE debtor_id = %s", (debtor_id,)
            ).fetchall()
        )
        parked = conn.execute(
            "SELECT source_kind, reason_code, body, message_type FROM pyswpt.parked_message"
        ).fetchall()
    wrong = [c for c in [0, *creditors] if principals.get(c) != expected[c]]
    rows.append(("accounts whose principal differs from the coordinators' books", "0", str(len(wrong)), not wrong))
    total = sum(principals.values())
    rows.append(("sum of the debtor's principals", "0", str(total), total == 0))

    rows += verify_parked(coordinators.poisoned, parked)
    audit = subprocess.run([*pyswpt_command(), "audit"], env=node.environ, capture_output=True, text=True)
    rows.append(("pyswpt audit exit status", "0", str(audit.returncode), audit.returncode == 0))
    return rows


def verify_parked(poisoned: list[tuple[Poison, bytes | None]], parked: list[tuple]) -> list[tuple[str, str, str, bool]]:
    """Each poison message parked with its reason, and nothing else. A request applied twice
    (delivered again after a crash between its commit and its ack: at least once) is answered
    twice: an answer parked twice counts once, as duplicate answers do in answered_one_way."""
    rows = []
    parked_answers = {
        (reason, answered_request(bytes(body)))
        for kind, reason, body, _t in parked
        if kind == "outbox" and body is not None
    }
    for poison in POISON:
        sent = [body for kind, body in poisoned if kind == poison]
        if not sent:
            continue
        if poison.source_kind == "queue":
            bodies = {bytes(body) for kind, reason, body, _t in parked if reason == poison.reason_code and body}
            found = sum(body in bodies for body in sent)
        else:
            found = sum((poison.reason_code, answered_request(body)) in parked_answers for body in sent)
        rows.append((f"parked as {poison.reason_code}: {poison.kind}", str(len(sent)), str(found), found == len(sent)))
    outbox_rows = sum(kind == "outbox" and body is not None for kind, _reason, body, _t in parked)
    distinct = len(parked) - outbox_rows + len(parked_answers)
    expected_total = len(poisoned)
    rows.append(("parked messages in all", str(expected_total), str(distinct), distinct == expected_total))
    return rows


def answered_request(body: bytes) -> tuple:
    """The request an answer's body names (its coordinator and request id)."""
    fields = json.loads(body)
    return tuple(fields[name] for name in ANSWER_KEY)


def request_key(request: Request) -> tuple:
    return (request.coordinator_type, request.coordinator_id, request.request_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfers", type=int, default=Settings.transfers)
    parser.add_argument("--concurrency", type=int, default=Settings.concurrency)
    parser.add_argument("--accounts", type=int, default=Settings.accounts)
    parser.add_argument("--fault-interval", type=float, default=Settings.fault_interval_seconds)
    parser.add_argument("--poison-every", type=int, default=Settings.poison_every)
    parser.add_argument("--min-fault-rounds", type=int, default=Settings.min_fault_rounds)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--crash-postgres", action="store_true", help="also crash the database server, once a round")
    parser.add_argument(
        "--flush-processes", type=int, default=Settings.flush_processes, help="1: the flusher in a thread of run all"
    )
    args = parser.parse_args()
    if args.flush_processes < 1:
        parser.error("--flush-processes must be at least 1")
    settings = Settings(
        transfers=args.transfers,
        concurrency=args.concurrency,
        accounts=args.accounts,
        fault_interval_seconds=args.fault_interval,
        poison_every=args.poison_every,
        min_fault_rounds=args.min_fault_rounds,
        crash_postgres=args.crash_postgres,
        flush_processes=args.flush_processes,
    )
    report = run_chaos(
        os.environ["PYSWPT_TEST_POSTGRES_URL"], os.environ["PYSWPT_TEST_RABBITMQ_URL"], settings, args.log_dir
    )
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
