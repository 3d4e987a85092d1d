"""End-to-end benchmark: a node under `pyswpt run all`, transfers through the broker, CPU per transfer.

Not a test (tests/test_end_to_end_benchmark.py runs a very short variant that
proves the run and its checks work). For each settings profile — pyswpt's own
defaults, and the reference's compose settings — a fresh database and a
RabbitMQ vhost of its own, `pyswpt configure` and `pyswpt run all`; one debtor
whose root account issues to K accounts; then for each scenario a closed loop
of C simulated coordinators, each doing PrepareTransfer → PreparedTransfer →
FinalizeTransfer (commit) → FinalizedTransfer through the broker, sender and
recipient at random ("spread") or every transfer paying one merchant ("hot").
After a warm-up, a measuring window gives:

* transfers per second (FinalizedTransfers received in the window);
* p50/p95/p99 latency of PrepareTransfer → PreparedTransfer, FinalizeTransfer →
  FinalizedTransfer, and FinalizeTransfer → the recipient's AccountTransfer; the
  first split at the PreparedTransfer's prepared_at (the start of the stage's
  transaction) into the way to the ledger and the way back;
* CPU per completed transfer split by process, sampled from /proc
  (benchmarks/cpu.py): each driver of `run all` with the workers it forked
  ("pyswpt all" is the supervisor with the drivers in its threads: the chores
  consumer, the flusher, the scanners), all PostgreSQL backends of the node's
  database, the RabbitMQ server (beam), this load generator, and the rest of
  the machine; the node's total RSS;
* the backends' CPU per transfer again, by the connection each serves (the
  application_name its driver gave it: a workers stage, its list and LISTEN
  sessions, the consumer, the flusher), to see which step costs the database what;
* commits and rollbacks per transfer (pg_stat_database), and the server's WAL flushes
  (pg_stat_wal: fsyncs, most of them for commits); with --sql-profile the SQL
  functions by self time per transfer (track_functions = all on the database) and the
  scans of each table per transfer.

The same run measures the machine's ceilings: the cores, the load average,
the broker + load generator against a stand-in that answers from memory
(benchmarks/stand_in.py), before the scenarios and again after them, the
messages per second through one quorum queue with nothing but a publisher and
a consumer (benchmarks/queue_rate.py), and pgbench TPC-B at 1 and 8 clients.
Every figure is also given as a ratio to those ceilings and to the goals of
issue 10.

Before each scenario the node's database is vacuumed, as autovacuum would have
done where it runs; with --autovacuum-naptime S, also during it, as a server's
autovacuum with that naptime would (benchmarks/autovacuum.py). After each scenario the loop stops, the node settles, and
benchmarks/chaos.py's checks run: every request answered one way only, every
principal as the coordinators' books say, the debtor's principals sum to zero,
nothing parked, `pyswpt audit` passes. With --idle-accounts N each profile
runs its scenarios again after N idle accounts of another debtor were
bulk-inserted (benchmark setup only: one set-based INSERT as the superuser,
not how accounts are made).

    PYSWPT_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
    PYSWPT_TEST_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2F \\
    .venv/bin/python benchmarks/end_to_end.py --json /tmp/e2e.json

It must run on the machine of the PostgreSQL and RabbitMQ servers (it reads
their processes' CPU from /proc). The PostgreSQL URL must be a superuser's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from pyswpt import topology
from pyswpt.sharding import Realm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import autovacuum  # noqa: E402  (benchmarks/, the script's own folder)
import chaos  # noqa: E402  (the node, the coordinators' books and the checks)
import cpu  # noqa: E402
import queue_rate  # noqa: E402
import vhosts  # noqa: E402  (tests/vhosts.py)
from conftest import new_database  # noqa: E402
from drivers import free_port  # noqa: E402

BINDING_KEY = "#"  # one shard holds every account, so that `pyswpt audit` checks conservation
# The reference's compose settings: the example values of its README (consumer 1 process ×
# 3 threads, prefetch 10; the same for chores; 2 web workers × 10 threads; 10 threads per
# worker stage) and its compose file's flush period.
PROFILES: dict[str, dict[str, str]] = {
    "defaults": {},
    "compose": {
        "WEBSERVER_WORKERS": "2",
        "WEBSERVER_THREADS": "10",
        "PROTOCOL_BROKER_PROCESSES": "1",
        "PROTOCOL_BROKER_THREADS": "3",
        "PROTOCOL_BROKER_PREFETCH_COUNT": "10",
        "CHORES_BROKER_PROCESSES": "1",
        "CHORES_BROKER_THREADS": "3",
        "CHORES_BROKER_PREFETCH_COUNT": "10",
        "PROCESS_TRANSFER_REQUESTS_THREADS": "10",
        "PROCESS_FINALIZATION_REQUESTS_THREADS": "10",
        "PROCESS_BALANCE_CHANGES_THREADS": "10",
        "FLUSH_PERIOD": "1.5",
    },
}
PLACEMENTS = ("spread", "hot")
MAX_AMOUNT = 1000
DRAIN_SECONDS = 300.0
SETUP_SECONDS = 600.0
# "to ledger" ends and "from ledger" begins at the PreparedTransfer's prepared_at: the
# start of the transaction in which the transfer-requests stage prepared it.
LATENCIES = ("prepare", "prepare to ledger", "prepare from ledger", "finalize", "account transfer")
PERCENTILES = (50, 95, 99)
PGBENCH_CLIENTS = (1, 8)
PGBENCH_SECONDS = 10
QUEUE_RATE_WARMUP_SECONDS = 1.0
QUEUE_RATE_SECONDS = 5.0
TOP_FUNCTIONS = 15
STATEMENT_WIDTH = 120  # characters of a statement's text in the table
# Process groups (the node's drivers are "pyswpt <program>").
POSTGRES = "postgres backends"
# A backend's group while sampling, by the application_name its driver gave the
# connection; folded into POSTGRES, and kept apart in Measured.postgres_cpu_seconds.
POSTGRES_CONNECTION_PREFIX = "postgres backend of "
QUEUE = "QUEUE"  # the node's queue in a connection's name, whatever its run called it
BROKER = "rabbitmq"
LOAD_GENERATOR = "load generator"
STAND_IN = "stand-in"
REST = "rest of machine"
NODE_PREFIX = "pyswpt "
MIB = 2**20
# The goals of issue 10 (server + PostgreSQL CPU, throughput, latency, memory, idle accounts).
GOAL_CPU_MS = 3.5
GOAL_TRANSFERS_PER_SECOND = 250.0
GOAL_PREPARE_P50_MS = 20.0
GOAL_RSS_MIB = 250.0
GOAL_IDLE_RATIO = 0.10
DEFAULTS_FACTOR = 2.0  # the defaults' figures may be this much worse than the goals


@dataclasses.dataclass(frozen=True)
class Options:
    profiles: tuple[str, ...] = ("defaults", "compose")
    placements: tuple[str, ...] = PLACEMENTS
    concurrencies: tuple[int, ...] = (20, 100)
    accounts: int = 200
    seconds: float = 60.0
    warmup_seconds: float = 10.0
    idle_accounts: int = 0
    sql_profile: bool = False
    stand_in: bool = True
    pgbench: bool = True
    autovacuum_naptime: float = 0.0  # seconds; 0: VACUUM before each scenario only


@dataclasses.dataclass
class Scenario:
    profile: str  # defaults, compose or stand-in
    placement: str
    concurrency: int
    idle_accounts: int = 0


@dataclasses.dataclass
class Measured:
    scenario: Scenario
    seconds: float
    transfers: int
    latencies_ms: dict[str, dict[int, float]]  # kind -> percentile -> ms
    cpu_seconds: dict[str, float]  # process group -> CPU seconds in the window
    postgres_cpu_seconds: dict[str, float]  # POSTGRES's, by the connection's application_name
    rss_mib: dict[str, float]  # the node's (or stand-in's) process groups, each its largest sum sampled
    pss_mib: dict[str, float]  # at the end of the window
    commits: int = 0
    rollbacks: int = 0  # transactions rolled back: serialization failures retried, refused calls
    wal_syncs: int = 0  # WAL flushes to disk of the whole server (nothing else runs on it meanwhile)
    functions: list[dict] = dataclasses.field(default_factory=list)  # per transfer, by self time
    statements: list[dict] = dataclasses.field(default_factory=list)  # per transfer, by total time
    tables: list[dict] = dataclasses.field(default_factory=list)  # per transfer, by sequential scans
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    checks: list[tuple[str, str, str, bool]] = dataclasses.field(default_factory=list)

    @property
    def transfers_per_second(self) -> float:
        return self.transfers / self.seconds

    def ms_per_transfer(self, *groups: str) -> float:
        return 1000 * sum(self.cpu_seconds.get(group, 0.0) for group in groups) / max(self.transfers, 1)

    @property
    def node_groups(self) -> list[str]:
        return sorted(group for group in self.cpu_seconds if group.startswith(NODE_PREFIX))

    @property
    def server_and_postgres_ms(self) -> float:
        return self.ms_per_transfer(*self.node_groups, POSTGRES)

    @property
    def server_per_load_generator(self) -> float:
        """Server + PostgreSQL CPU per transfer at the machine's pace: divided by the load
        generator's, whose work per transfer is fixed, so that a slower machine moves both."""
        load_generator_ms = self.ms_per_transfer(LOAD_GENERATOR)
        return self.server_and_postgres_ms / load_generator_ms if load_generator_ms else float("inf")

    @property
    def paced_transfers(self) -> float:
        """Transfers/s at the machine's pace: times the load generator's CPU per transfer, which
        grows as much as throughput falls when the machine slows down."""
        return self.transfers_per_second * self.ms_per_transfer(LOAD_GENERATOR)

    @property
    def total_rss_mib(self) -> float:
        return sum(self.rss_mib.values())

    @property
    def total_pss_mib(self) -> float:
        return sum(self.pss_mib.values())

    @property
    def ok(self) -> bool:
        return all(ok for *_row, ok in self.checks)


# --- the load generator ----------------------------------------------------------------------


class LoadGenerator(chaos.Coordinators):
    """Closed-loop coordinators that time every answer. A new transfer starts the moment one
    ends, from the consumer callback; publishes are not confirmed (the loop is the load, and a
    lost message would show as an unanswered request)."""

    confirm_delivery = False

    def __init__(self, broker_url: str, queue: str, debtor_id: int, creditors: list[int]):
        super().__init__(broker_url, queue, debtor_id, Realm.from_binding_key(BINDING_KEY))
        self.creditors = creditors
        self.channel.basic_consume(self.inbox, self.on_delivery, auto_ack=True)
        self.placement = "spread"
        self.concurrency = 0
        self.running = False
        self.in_flight = 0
        self.transfers: list[chaos.Request] = []
        self.by_note: dict[str, chaos.Request] = {}
        self.window_open = False
        self.completed_in_window = 0
        self.latencies: dict[str, list[float]] = {kind: [] for kind in LATENCIES}

    def receive(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.connection.process_data_events(time_limit=remaining)

    def on_delivery(self, _channel, _method, _properties, body: bytes) -> None:
        self.handle(json.loads(body), body)

    def handle(self, fields: dict, body: bytes) -> None:
        now = time.monotonic()
        if fields["type"] == "AccountTransfer" and fields["acquired_amount"] > 0:
            request = self.by_note.get(fields["transfer_note"])
            if request is not None:
                self.record("account transfer", now - request.sent_at)
        request = self.requests.get((fields.get("coordinator_id"), fields.get("coordinator_request_id")))
        state, sent_at = (request.state, request.sent_at) if request else (None, 0.0)
        super().handle(fields, body)
        if request is None or request.coordinator_type != "direct" or request.state == state:
            return
        if state == "preparing" and fields["type"] == "PreparedTransfer":
            self.record("prepare", now - sent_at)
            self.record_prepare_split(fields["prepared_at"], now - sent_at)
        if request.done:
            if request.state == "committed":
                self.record("finalize", now - sent_at)
            self.in_flight -= 1
            self.completed_in_window += self.window_open
            self.top_up()

    def record_prepare_split(self, prepared_at: str, prepare_seconds: float) -> None:
        """Split a prepare latency at prepared_at (both clocks are this machine's)."""
        from_ledger = time.time() - dt.datetime.fromisoformat(prepared_at).timestamp()
        self.record("prepare to ledger", prepare_seconds - from_ledger)
        self.record("prepare from ledger", from_ledger)

    def record(self, kind: str, seconds: float) -> None:
        if self.window_open:
            self.latencies[kind].append(seconds * 1000)

    def start_loop(self, placement: str, concurrency: int) -> None:
        self.placement, self.concurrency, self.running = placement, concurrency, True
        self.top_up()

    def top_up(self) -> None:
        while self.running and self.in_flight < self.concurrency:
            if self.placement == "hot":
                sender, recipient = random.choice(self.creditors[1:]), self.creditors[0]
            else:
                sender, recipient = random.sample(self.creditors, 2)
            request = self.start_request(sender, recipient, random.randint(1, MAX_AMOUNT))
            # The note finds the request again in the recipient's AccountTransfer.
            request.transfer_note = f"e2e {request.request_id}"
            self.by_note[request.transfer_note] = request
            self.transfers.append(request)
            self.in_flight += 1

    def open_window(self) -> None:
        self.latencies = {kind: [] for kind in LATENCIES}
        self.completed_in_window = 0
        self.window_open = True

    def close_window(self) -> tuple[int, dict[str, dict[int, float]]]:
        self.window_open = False
        return self.completed_in_window, {kind: percentiles(values) for kind, values in self.latencies.items()}

    def drain(self) -> tuple[str, str, str, bool]:
        """Stop starting transfers and wait for the ones in flight: a check row, how many stay unanswered."""
        self.running = False
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.in_flight > 0 and time.monotonic() < deadline:
            self.receive(0.1)
        return ("transfers unanswered after the loop stopped", "0", str(self.in_flight), self.in_flight == 0)


def percentiles(values: list[float]) -> dict[int, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {p: ordered[min(len(ordered) - 1, len(ordered) * p // 100)] for p in PERCENTILES}


# --- which process is whose ------------------------------------------------------------------


class Classifier:
    """Puts a process in its group: a driver of the node (with every process under it, by the
    program the driver runs), a backend of the node's database, the broker, the stand-in, or
    this load generator."""

    def __init__(
        self, database_url: str | None = None, node_pid: int = 0, stand_in_pid: int = 0, queue: str | None = None
    ):
        self.node_pid = node_pid
        self.queue = queue  # named in the consumer's application_name; each run has a queue of its own
        self.stand_in_pid = stand_in_pid
        self.own_pid = os.getpid()
        self.programs: dict[int, str] = {}
        self.backends: dict[int, str] = {}  # pid -> application_name of the connection it serves
        self.conn = psycopg.connect(database_url, autocommit=True) if database_url else None

    def refresh(self) -> None:
        if self.conn is not None:
            rows = self.conn.execute(
                """
                SELECT pid, application_name
                FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                """
            ).fetchall()
            self.backends = {pid: self.connection_name(name) for pid, name in rows}

    def connection_name(self, application_name: str) -> str:
        """The application_name, the run's queue said as QUEUE: one row for the consumer across runs."""
        if not application_name:
            return "(no name)"
        return application_name.replace(self.queue, QUEUE) if self.queue else application_name

    def __call__(self, stat: cpu.ProcessStat) -> str | None:
        if stat.pid == self.own_pid:
            return LOAD_GENERATOR
        if stat.command == "beam.smp":
            return BROKER
        if stat.pid in self.backends:
            return POSTGRES_CONNECTION_PREFIX + self.backends[stat.pid]
        if stat.pid == self.stand_in_pid:
            return STAND_IN
        if self.node_pid and stat.session == self.node_pid:
            if stat.pid not in self.programs:
                self.programs[stat.pid] = self.program_of(stat)
            return NODE_PREFIX + self.programs[stat.pid]
        return None

    def program_of(self, stat: cpu.ProcessStat) -> str:
        """`run all`'s child that `stat` is or descends from names the program (`run PROGRAM`)."""
        if stat.pid == self.node_pid:
            return "all"
        pid, parent = stat.pid, stat.parent
        while parent not in (self.node_pid, 0, 1) and (above := cpu.read_stat(parent)) is not None:
            pid, parent = parent, above.parent
        return (cpu.command_line(pid) or ["?"])[-1]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# --- one measuring window --------------------------------------------------------------------


def measure(generator: LoadGenerator, sampler: cpu.Sampler, scenario: Scenario, options: Options) -> Measured:
    """Warm up, then measure one window of the closed loop (which keeps running)."""
    generator.start_loop(scenario.placement, scenario.concurrency)
    generator.receive(options.warmup_seconds)
    sampler.start()
    generator.open_window()
    generator.receive(options.seconds)
    window = sampler.stop()
    transfers, latencies = generator.close_window()
    cpu_seconds, postgres_cpu_seconds = fold_postgres_connections(window.cpu_seconds)
    ours = sum(seconds for group, seconds in cpu_seconds.items() if group != cpu.MACHINE)
    cpu_seconds[REST] = cpu_seconds[cpu.MACHINE] - ours
    own = [group for group in window.max_rss_bytes if group.startswith(NODE_PREFIX) or group == STAND_IN]
    return Measured(
        scenario=scenario,
        seconds=window.seconds,
        transfers=transfers,
        latencies_ms=latencies,
        cpu_seconds=cpu_seconds,
        postgres_cpu_seconds=postgres_cpu_seconds,
        rss_mib={group: window.max_rss_bytes[group] / MIB for group in own},
        pss_mib={group: window.pss_bytes.get(group, 0) / MIB for group in own},
        load_average=os.getloadavg(),
    )


def fold_postgres_connections(sampled: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """The groups sampled, the backends' summed into POSTGRES; and the backends' CPU by connection."""
    groups: dict[str, float] = {POSTGRES: 0.0}
    connections: dict[str, float] = {}
    for group, seconds in sampled.items():
        if group.startswith(POSTGRES_CONNECTION_PREFIX):
            connections[group.removeprefix(POSTGRES_CONNECTION_PREFIX)] = seconds
            groups[POSTGRES] += seconds
        else:
            groups[group] = seconds
    return groups, connections


# --- PostgreSQL statistics -------------------------------------------------------------------


def transaction_counts(conn: psycopg.Connection) -> tuple[int, int, int]:
    """Transactions committed and rolled back in the node's database so far, and the server's WAL flushes."""
    query = """
        SELECT d.xact_commit, d.xact_rollback, w.wal_sync
        FROM pg_stat_database AS d, pg_stat_wal AS w
        WHERE d.datname = current_database()
    """
    return conn.execute(query).fetchone()


def function_stats(conn: psycopg.Connection) -> dict[str, tuple[int, float, float]]:
    """Calls, total and self milliseconds of each function of the database (track_functions)."""
    rows = conn.execute("SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions").fetchall()
    return {name: (calls, total, own) for name, calls, total, own in rows}


def table_stats(conn: psycopg.Connection) -> dict[str, tuple[int, int, int]]:
    """Sequential scans, rows they read, and index scans of each table of pyswpt."""
    rows = conn.execute(
        """
        SELECT relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0)
        FROM pg_stat_user_tables
        WHERE schemaname = 'pyswpt'
        """
    ).fetchall()
    return {name: (seq_scans, seq_rows, index_scans) for name, seq_scans, seq_rows, index_scans in rows}


def table_deltas(before: dict, after: dict, transfers: int) -> list[dict]:
    """Per transfer: scans of each table that was scanned, by sequential scans (a lookup by key
    that scans a whole table is a plan gone wrong; tests/sql/test_plans.py)."""
    per = max(transfers, 1)
    rows = []
    for name, counts in after.items():
        seq_scans, seq_rows, index_scans = (
            now - then for now, then in zip(counts, before.get(name, (0, 0, 0)), strict=True)
        )
        if seq_scans or index_scans:
            rows.append(
                {
                    "table": name,
                    "seq_scans": seq_scans / per,
                    "seq_rows": seq_rows / per,
                    "index_scans": index_scans / per,
                }
            )
    return sorted(rows, key=lambda row: (-row["seq_scans"], -row["index_scans"]))


def statement_stats(conn: psycopg.Connection) -> dict[tuple[bool, str], tuple[int, float]]:
    """Calls and total milliseconds (planning and execution) of each statement run in this
    database, top-level or nested in a function (pg_stat_statements); empty where it is not loaded."""
    if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone():
        return {}
    rows = conn.execute(
        """
        SELECT toplevel, query, sum(calls)::bigint, sum(total_plan_time + total_exec_time)
        FROM pg_stat_statements
        WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
        GROUP BY toplevel, query
        """
    ).fetchall()
    return {(toplevel, query): (calls, total) for toplevel, query, calls, total in rows}


def statement_deltas(before: dict, after: dict, transfers: int) -> list[dict]:
    """Per transfer: calls and total milliseconds of each statement, by total time."""
    rows = []
    for (toplevel, query), (calls, total) in after.items():
        calls0, total0 = before.get((toplevel, query), (0, 0.0))
        if calls > calls0:
            per = max(transfers, 1)
            rows.append(
                {
                    "statement": " ".join(query.split()),
                    "toplevel": toplevel,
                    "calls": (calls - calls0) / per,
                    "total_ms": (total - total0) / per,
                }
            )
    return sorted(rows, key=lambda row: -row["total_ms"])


def enable_sql_profile(database_url: str) -> None:
    """track_functions for every session of the node; pg_stat_statements too where the server preloads it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        dbname = sql.Identifier(conn.info.dbname)
        conn.execute(sql.SQL("ALTER DATABASE {} SET track_functions = 'all'").format(dbname))
        preloaded = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
        if "pg_stat_statements" in preloaded:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute(sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track = 'all'").format(dbname))
        else:
            print("pg_stat_statements is not preloaded: no statement profile.", file=sys.stderr)


def function_deltas(before: dict, after: dict, transfers: int) -> list[dict]:
    """Per transfer: calls, self and total milliseconds of each function, by self time."""
    rows = []
    for name, (calls, total, own) in after.items():
        calls0, total0, own0 = before.get(name, (0, 0.0, 0.0))
        if calls > calls0:
            per = max(transfers, 1)
            rows.append(
                {
                    "function": name,
                    "calls": (calls - calls0) / per,
                    "self_ms": (own - own0) / per,
                    "total_ms": (total - total0) / per,
                }
            )
    return sorted(rows, key=lambda row: -row["self_ms"])


# --- a node and its scenarios ----------------------------------------------------------------


def run_profile(profile: str, options: Options, postgres_url: str, rabbitmq_url: str, log_dir: Path) -> list[Measured]:
    admin = vhosts.vhost_admin_for(rabbitmq_url, os.environ.get(vhosts.MANAGEMENT_URL_VARIABLE))
    with (
        new_database(postgres_url, "pyswpt_e2e") as database_url,
        vhosts.own_vhost(admin, rabbitmq_url, "pyswpt_e2e") as broker_url,
    ):
        if options.sql_profile:
            enable_sql_profile(database_url)
        queue = f"e2e_{uuid.uuid4().hex[:8]}"
        settings = {"PROTOCOL_BROKER_QUEUE_ROUTING_KEY": BINDING_KEY, **PROFILES[profile]}
        environ = chaos.node_environment(database_url, broker_url, queue, free_port(), settings)
        node = chaos.Node(
            database_url, broker_url, vhosts.vhost_of(broker_url), queue, environ, log_dir / f"{queue}.log"
        )
        node.configure()
        node.start()
        try:
            measured = drive_node(node, profile, options)
        finally:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        status = node.process.wait(timeout=60)
        left = node.tree_pids()
        measured[-1].checks.append(("run all exit status after SIGTERM", "0", str(status), status == 0))
        measured[-1].checks.append(("processes of the node left after it stopped", "0", str(len(left)), not left))
        return measured


def drive_node(node: chaos.Node, profile: str, options: Options) -> list[Measured]:
    realm = Realm.from_binding_key(BINDING_KEY)
    debtor_id = chaos.pick_debtor(realm)
    creditors = chaos.pick_creditors(realm, debtor_id, options.accounts)
    generator = LoadGenerator(node.broker_url, node.queue, debtor_id, creditors)
    funding = chaos.open_and_fund_accounts(generator, node.database_url, creditors, time.monotonic() + SETUP_SECONDS)
    classifier = Classifier(node.database_url, node_pid=node.process.pid, queue=node.queue)
    sampler = cpu.Sampler(classifier, classifier.refresh)
    measured = []
    idle_levels = (0, options.idle_accounts) if options.idle_accounts else (0,)
    try:
        with psycopg.connect(node.database_url, autocommit=True) as stats:
            for idle_accounts in idle_levels:
                if idle_accounts:
                    insert_idle_accounts(node.database_url, chaos.pick_debtor(realm), idle_accounts)
                for placement in options.placements:
                    for concurrency in options.concurrencies:
                        scenario = Scenario(profile, placement, concurrency, idle_accounts)
                        measured.append(measure_on_node(node, generator, sampler, stats, scenario, options, funding))
                        print(one_line(measured[-1]), file=sys.stderr, flush=True)
    finally:
        classifier.close()
        generator.connection.close()
    return measured


def measure_on_node(
    node: chaos.Node,
    generator: LoadGenerator,
    sampler: cpu.Sampler,
    stats: psycopg.Connection,
    scenario: Scenario,
    options: Options,
    funding: list[chaos.Request],
) -> Measured:
    vacuum(stats)
    counts_before, functions_before = transaction_counts(stats), function_stats(stats)
    statements_before, tables_before = statement_stats(stats), table_stats(stats)
    with autovacuum.running(node.database_url, options.autovacuum_naptime):
        measured = measure(generator, sampler, scenario, options)
    measured.commits, measured.rollbacks, measured.wal_syncs = (
        after - before for before, after in zip(counts_before, transaction_counts(stats), strict=True)
    )
    if options.sql_profile:
        measured.functions = function_deltas(functions_before, function_stats(stats), measured.transfers)
        measured.statements = statement_deltas(statements_before, statement_stats(stats), measured.transfers)
        measured.tables = table_deltas(tables_before, table_stats(stats), measured.transfers)
    measured.checks.append(generator.drain())
    chaos.wait_until_quiet(generator, node.database_url)
    creditors = generator.creditors
    measured.checks += chaos.verify(node, generator, generator.debtor_id, creditors, funding, generator.transfers)
    return measured


def vacuum(conn: psycopg.Connection) -> None:
    """What autovacuum would have done by now where it runs (the CI machines here turn it off):
    without it, each scenario pays for the dead queue and outbox rows of the ones before."""
    conn.execute("VACUUM (ANALYZE)")


def insert_idle_accounts(database_url: str, debtor_id: int, count: int) -> None:
    """Benchmark setup only: `count` accounts of another debtor in one set-based INSERT (as
    the superuser, past the API functions), so that a million take seconds, not hours."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO pyswpt.account
            SELECT idle.*
            FROM generate_series(1, %(count)s) AS creditor_id
            -- LATERAL: `(new_account(...)).*` would call the function once per column.
            CROSS JOIN LATERAL pyswpt_private.new_account(%(debtor_id)s, creditor_id, now()) AS idle
            """,
            {"debtor_id": debtor_id, "count": count},
        )
        conn.execute("VACUUM ANALYZE pyswpt.account")


# --- the machine's ceilings ------------------------------------------------------------------


def run_stand_in(options: Options, rabbitmq_url: str) -> list[Measured]:
    """The broker and this load generator against benchmarks/stand_in.py, for each C."""
    admin = vhosts.vhost_admin_for(rabbitmq_url, os.environ.get(vhosts.MANAGEMENT_URL_VARIABLE))
    with vhosts.own_vhost(admin, rabbitmq_url, "pyswpt_e2e_stand_in") as broker_url:
        queue = f"stand_in_{uuid.uuid4().hex[:8]}"
        topology.subscribe(broker_url, queue, BINDING_KEY)
        script = Path(__file__).with_name("stand_in.py")
        stand_in = subprocess.Popen([sys.executable, str(script), broker_url, queue])
        classifier = Classifier(stand_in_pid=stand_in.pid)
        sampler = cpu.Sampler(classifier)
        realm = Realm.from_binding_key(BINDING_KEY)
        debtor_id = chaos.pick_debtor(realm)
        generator = LoadGenerator(
            broker_url, queue, debtor_id, chaos.pick_creditors(realm, debtor_id, options.accounts)
        )
        measured = []
        try:
            for concurrency in options.concurrencies:
                measured.append(measure(generator, sampler, Scenario(STAND_IN, "spread", concurrency), options))
                measured[-1].checks.append(generator.drain())
                print(one_line(measured[-1]), file=sys.stderr, flush=True)
        finally:
            generator.connection.close()
            stand_in.terminate()
            stand_in.wait(timeout=30)
        return measured


@dataclasses.dataclass(frozen=True)
class QueueRate:
    """Messages through one quorum queue in a window, publisher and consumer running together."""

    seconds: float
    messages: int
    broker_cpu_seconds: float

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.seconds

    @property
    def broker_us_per_message(self) -> float:
        return 1e6 * self.broker_cpu_seconds / self.messages if self.messages else float("nan")


def run_queue_rate(rabbitmq_url: str) -> QueueRate:
    """The broker's raw rate on a quorum queue (benchmarks/queue_rate.py), in a vhost of its own."""
    admin = vhosts.vhost_admin_for(rabbitmq_url, os.environ.get(vhosts.MANAGEMENT_URL_VARIABLE))
    with vhosts.own_vhost(admin, rabbitmq_url, "pyswpt_e2e_queue_rate") as broker_url:
        queue = f"queue_rate_{uuid.uuid4().hex[:8]}"
        topology.subscribe(broker_url, queue, BINDING_KEY)
        consumer = queue_rate.Consumer(broker_url, queue)
        script = Path(__file__).with_name("queue_rate.py")
        publishing_seconds = str(QUEUE_RATE_WARMUP_SECONDS + QUEUE_RATE_SECONDS)
        command = [sys.executable, str(script), broker_url, queue, publishing_seconds]
        publisher = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        sampler = cpu.Sampler(Classifier())
        try:
            consumer.receive(QUEUE_RATE_WARMUP_SECONDS)
            sampler.start()
            messages = consumer.receive(QUEUE_RATE_SECONDS)
            window = sampler.stop()
        finally:
            publisher.wait(timeout=60)
            consumer.close()
        if publisher.returncode != 0:
            raise RuntimeError(f"the quorum queue's publisher exited with status {publisher.returncode}")
        return QueueRate(window.seconds, messages, window.cpu_seconds.get(BROKER, 0.0))


def run_pgbench(postgres_url: str) -> dict[int, float]:
    """TPC-B transactions per second at each client count, in a scratch database."""
    tps = {}
    with new_database(postgres_url, "pyswpt_e2e_pgbench") as url:
        subprocess.run(["pgbench", "-i", "-q", "-s", "1", url], check=True, capture_output=True)
        for clients in PGBENCH_CLIENTS:
            jobs = str(min(clients, os.cpu_count() or 1))
            command = ["pgbench", "-n", "-c", str(clients), "-j", jobs, "-T", str(PGBENCH_SECONDS), url]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            tps[clients] = float(re.search(r"tps = ([\d.]+)", output).group(1))
    return tps


@dataclasses.dataclass
class Ceilings:
    cores: int
    load_average_at_start: tuple[float, float, float]
    stand_in: list[Measured]
    pgbench_tps: dict[int, float]
    # Server settings that change the figures: without autovacuum the queue and outbox
    # tables keep their dead rows, and every scenario on a node runs slower than the last.
    server_settings: dict[str, str] = dataclasses.field(default_factory=dict)
    autovacuum_naptime: float = 0.0  # seconds between the vacuum passes during the scenarios; 0: none
    queue_rate: QueueRate | None = None
    # The stand-in again after the scenarios: this machine's pace drifts by up to a third over
    # a run of many minutes, and a ceiling from its start alone judged every scenario by it.
    stand_in_at_end: list[Measured] = dataclasses.field(default_factory=list)

    def stand_ins_at(self, concurrency: int) -> list[Measured]:
        """The stand-in's runs at this C that completed transfers, at the start and at the end."""
        runs = self.stand_in + self.stand_in_at_end
        return [m for m in runs if m.scenario.concurrency == concurrency and m.transfers]

    def stand_in_rate(self, concurrency: int) -> float | None:
        """The stand-in's transfers per second at this C, the mean of its runs."""
        runs = self.stand_ins_at(concurrency)
        return statistics.fmean(m.transfers_per_second for m in runs) if runs else None

    def node_budget_ms(self, concurrency: int) -> float | None:
        """CPU per transfer left to a node that kept pace with the stand-in: the cores less
        what the broker and the load generator needed at the stand-in's rate; the mean of its runs."""
        runs = self.stand_ins_at(concurrency)
        return statistics.fmean(self.budget_of(m) for m in runs) if runs else None

    def budget_of(self, stand_in: Measured) -> float:
        spent = stand_in.cpu_seconds.get(BROKER, 0.0) + stand_in.cpu_seconds.get(LOAD_GENERATOR, 0.0)
        return 1000 * (self.cores * stand_in.seconds - spent) / stand_in.transfers


# --- the report ------------------------------------------------------------------------------


def one_line(m: Measured) -> str:
    s = m.scenario
    return (
        f"{s.profile} {s.placement} C={s.concurrency} idle={s.idle_accounts}: {m.transfers_per_second:.1f}/s,"
        f" prepare p50 {m.latencies_ms['prepare'].get(50, float('nan')):.1f} ms,"
        f" server+PG {m.server_and_postgres_ms:.2f} ms/transfer, load {m.load_average[0]:.1f},"
        f" checks {'ok' if m.ok else 'FAILED'}"
    )


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if value is not None and reference else "–"


def scenario_table(results: list[Measured], ceilings: Ceilings) -> list[str]:
    lines = [
        "| settings | placement | C | idle accounts | transfers/s | ÷ stand-in | prepare p50/p95/p99 ms"
        " | prepare to ledger p50/p95 ms | prepare from ledger p50/p95 ms"
        " | finalize p50/p95 ms | AccountTransfer p50/p95 ms | server+PG CPU ms/transfer | ÷ budget"
        " | RSS MiB (PSS) | commits (rollbacks)/transfer | WAL flushes/transfer | load avg | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        s = m.scenario
        lat = m.latencies_ms

        def cell(kind: str, points: tuple[int, ...], lat=lat) -> str:
            return "/".join(f"{lat[kind][p]:.0f}" if p in lat[kind] else "–" for p in points)

        lines.append(
            f"| {s.profile} | {s.placement} | {s.concurrency} | {s.idle_accounts} | {m.transfers_per_second:.1f}"
            f" | {ratio(m.transfers_per_second, ceilings.stand_in_rate(s.concurrency))}"
            f" | {cell('prepare', (50, 95, 99))} | {cell('prepare to ledger', (50, 95))}"
            f" | {cell('prepare from ledger', (50, 95))} | {cell('finalize', (50, 95))}"
            f" | {cell('account transfer', (50, 95))} | {m.server_and_postgres_ms:.2f}"
            f" | {ratio(m.server_and_postgres_ms, ceilings.node_budget_ms(s.concurrency))}"
            f" | {m.total_rss_mib:.0f} ({m.total_pss_mib:.0f}) | {m.commits / max(m.transfers, 1):.1f}"
            f" ({m.rollbacks / max(m.transfers, 1):.2f}) | {m.wal_syncs / max(m.transfers, 1):.2f}"
            f" | {m.load_average[0]:.1f} | {'ok' if m.ok else 'FAILED'} |"
        )
    return lines


def cpu_table(results: list[Measured]) -> list[str]:
    """CPU milliseconds per completed transfer, by process group."""
    groups = sorted({g for m in results for g in m.cpu_seconds if g.startswith(NODE_PREFIX) or g == STAND_IN})
    groups += [POSTGRES, BROKER, LOAD_GENERATOR, REST]
    lines = [
        "| settings | placement | C | idle | " + " | ".join(groups) + " | machine busy cores |",
        "|---|---|---|---|" + "---|" * (len(groups) + 1),
    ]
    for m in results:
        s = m.scenario
        cells = " | ".join(f"{m.ms_per_transfer(group):.2f}" for group in groups)
        busy = m.cpu_seconds[cpu.MACHINE] / m.seconds
        lines.append(f"| {s.profile} | {s.placement} | {s.concurrency} | {s.idle_accounts} | {cells} | {busy:.2f} |")
    return lines


def postgres_connections_table(results: list[Measured]) -> list[str]:
    """The postgres backends' column of cpu_table split by the application_name of the connection
    each serves (a driver's stage, its LISTEN session...): one row per name, the costliest first."""
    names = sorted(
        {name for m in results for name in m.postgres_cpu_seconds},
        key=lambda name: -max(m.postgres_cpu_seconds.get(name, 0.0) / max(m.transfers, 1) for m in results),
    )
    columns = [
        f"{m.scenario.profile} {m.scenario.placement} C={m.scenario.concurrency} idle={m.scenario.idle_accounts}"
        for m in results
    ]
    lines = ["| connection | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name in names:
        per_transfer = (1000 * m.postgres_cpu_seconds.get(name, 0.0) / max(m.transfers, 1) for m in results)
        lines.append(f"| {name} | " + " | ".join(f"{ms:.3f}" for ms in per_transfer) + " |")
    return lines


def memory_table(results: list[Measured]) -> list[str]:
    """RSS (PSS) MiB by process group: RSS counts the shared libraries in every process, PSS shares them out."""
    groups = sorted({group for m in results for group in m.rss_mib})
    lines = [
        "| settings | placement | C | idle | " + " | ".join(groups) + " |",
        "|---|---|---|---|" + "---|" * len(groups),
    ]
    for m in results:
        s = m.scenario
        cells = " | ".join(
            f"{m.rss_mib[group]:.0f} ({m.pss_mib[group]:.0f})" if group in m.rss_mib else "–" for group in groups
        )
        lines.append(f"| {s.profile} | {s.placement} | {s.concurrency} | {s.idle_accounts} | {cells} |")
    return lines


def ceilings_table(ceilings: Ceilings) -> list[str]:
    load = "/".join(f"{value:.1f}" for value in ceilings.load_average_at_start)
    lines = [
        "| ceiling | value |",
        "|---|---|",
        f"| cores | {ceilings.cores} |",
        f"| load average 1/5/15 min at the start | {load} |",
    ]
    for when, runs in (("start", ceilings.stand_in), ("end", ceilings.stand_in_at_end)):
        for m in runs:
            budget = ceilings.budget_of(m) if m.transfers else float("nan")
            lines.append(
                f"| stand-in C={m.scenario.concurrency} at the {when}: transfers/s; CPU ms/transfer broker"
                f" / load generator / stand-in; node budget | {m.transfers_per_second:.0f};"
                f" {m.ms_per_transfer(BROKER):.2f} / {m.ms_per_transfer(LOAD_GENERATOR):.2f}"
                f" / {m.ms_per_transfer(STAND_IN):.2f}; {budget:.2f} ms |"
            )
    for c in dict.fromkeys(m.scenario.concurrency for m in ceilings.stand_in):
        budget = ceilings.node_budget_ms(c)
        if budget is not None:
            lines.append(
                f"| node CPU budget per transfer at the stand-in's rate, C={c}, mean of its runs | {budget:.2f} ms |"
            )
    if (rate := ceilings.queue_rate) is not None:
        lines.append(
            f"| one quorum queue, publisher confirms per {queue_rate.BATCH_SIZE} and consumer together:"
            f" messages/s; broker CPU µs/message; transfers/s at {queue_rate.MESSAGES_PER_TRANSFER} messages each"
            f" | {rate.messages_per_second:.0f}; {rate.broker_us_per_message:.0f};"
            f" {rate.messages_per_second / queue_rate.MESSAGES_PER_TRANSFER:.0f} |"
        )
    for clients, tps in ceilings.pgbench_tps.items():
        lines.append(f"| pgbench TPC-B, {clients} clients | {tps:.0f} transactions/s |")
    settings = ", ".join(f"{name} = {value!r}" for name, value in ceilings.server_settings.items())
    lines.append(f"| PostgreSQL settings | {settings} |")
    vacuum_in_scenarios = (
        f"every {ceilings.autovacuum_naptime:g} s, as autovacuum would (benchmarks/autovacuum.py)"
        if ceilings.autovacuum_naptime > 0
        else "none (VACUUM (ANALYZE) before each scenario only)"
    )
    lines.append(f"| vacuum during the scenarios | {vacuum_in_scenarios} |")
    return lines


def goals_table(results: list[Measured]) -> list[str]:
    """Each goal of issue 10 against the worst figure of a profile (the defaults get 2× slack)."""
    lines = ["| goal | settings | target | measured (worst) | ÷ target | met |", "|---|---|---|---|---|---|"]
    for profile in dict.fromkeys(m.scenario.profile for m in results):
        factor = DEFAULTS_FACTOR if profile == "defaults" else 1.0
        plain = [m for m in results if m.scenario.profile == profile and m.scenario.idle_accounts == 0]
        c_max = [m for m in plain if m.scenario.concurrency == max(m.scenario.concurrency for m in plain)]
        c_min = [m for m in plain if m.scenario.concurrency == min(m.scenario.concurrency for m in plain)]
        rows = [
            (
                "server+PG CPU ms/transfer, largest C",
                GOAL_CPU_MS * factor,
                max(m.server_and_postgres_ms for m in c_max),
                False,
            ),
            (
                "transfers/s, largest C",
                GOAL_TRANSFERS_PER_SECOND / factor,
                min(m.transfers_per_second for m in c_max),
                True,
            ),
            (
                "prepare p50 ms, smallest C",
                GOAL_PREPARE_P50_MS * factor,
                max(m.latencies_ms["prepare"].get(50, float("inf")) for m in c_min),
                False,
            ),
            ("node RSS MiB", GOAL_RSS_MIB * factor, max(m.total_rss_mib for m in plain), False),
        ]
        for name, target, value, at_least in rows:
            met = value >= target if at_least else value <= target
            sign, verdict = ("≥" if at_least else "≤"), ("yes" if met else "no")
            lines.append(
                f"| {name} | {profile} | {sign} {target:g} | {value:.2f} | {ratio(value, target)} | {verdict} |"
            )
        lines += idle_goal_rows(profile, results)
    return lines


def idle_goal_rows(profile: str, results: list[Measured]) -> list[str]:
    """Throughput and CPU per transfer with idle accounts against the same scenario without.

    The two runs are minutes apart, and this machine's pace drifts by up to a
    third in that time: the goal is judged on the figures at the machine's
    pace (Measured.paced_transfers, server_per_load_generator); the raw ones are shown beside them.
    """
    rows = []
    for m in results:
        s = m.scenario
        if s.profile != profile or s.idle_accounts == 0:
            continue
        base = next(b for b in results if b.scenario == dataclasses.replace(s, idle_accounts=0))
        for name, value, reference, judged in (
            ("transfers/s with idle accounts ÷ without", m.transfers_per_second, base.transfers_per_second, False),
            ("the same at the machine's pace", m.paced_transfers, base.paced_transfers, True),
            (
                "server+PG CPU/transfer with idle ÷ without",
                m.server_and_postgres_ms,
                base.server_and_postgres_ms,
                False,
            ),
            ("the same at the machine's pace", m.server_per_load_generator, base.server_per_load_generator, True),
        ):
            change = value / reference - 1 if reference else float("inf")
            verdict = ("yes" if abs(change) <= GOAL_IDLE_RATIO else "no") if judged else "–"
            rows.append(
                f"| {name}, {s.placement} C={s.concurrency} | {profile} | within ±{GOAL_IDLE_RATIO:.0%}"
                f" | {change:+.1%} | {ratio(value, reference)} | {verdict} |"
            )
    return rows


def functions_table(results: list[Measured]) -> list[str]:
    lines = []
    for m in results:
        if not m.functions:
            continue
        s = m.scenario
        total = sum(row["self_ms"] for row in m.functions)
        calls = sum(row["calls"] for row in m.functions)
        lines += [
            "",
            f"SQL functions, {s.profile} {s.placement} C={s.concurrency} idle={s.idle_accounts}:"
            f" {calls:.1f} calls and {total:.2f} ms of function self time per transfer",
            "",
            "| function | calls/transfer | self ms/transfer | total ms/transfer |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {row['function']} | {row['calls']:.2f} | {row['self_ms']:.3f} | {row['total_ms']:.3f} |"
            for row in m.functions[:TOP_FUNCTIONS]
        ]
        if m.statements:
            lines += [
                "",
                f"SQL statements, {s.profile} {s.placement} C={s.concurrency} idle={s.idle_accounts}:"
                f" {sum(row['calls'] for row in m.statements if row['toplevel']):.1f} top-level statements per"
                " transfer (pg_stat_statements; nested ones are inside the functions above)",
                "",
                "| statement | top-level | calls/transfer | total ms/transfer |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {row['statement'][:STATEMENT_WIDTH]} | {'yes' if row['toplevel'] else 'no'}"
                f" | {row['calls']:.2f} | {row['total_ms']:.3f} |"
                for row in m.statements[:TOP_FUNCTIONS]
            ]
        lines += [
            "",
            f"Table scans, {s.profile} {s.placement} C={s.concurrency} idle={s.idle_accounts}"
            " (pg_stat_user_tables; the flusher takes outbox rows with sequential scans)",
            "",
            "| table | sequential scans/transfer | rows they read/transfer | index scans/transfer |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {row['table']} | {row['seq_scans']:.2f} | {row['seq_rows']:.1f} | {row['index_scans']:.2f} |"
            for row in m.tables
        ]
    return lines


def failed_checks(results: list[Measured]) -> list[str]:
    return [
        f"FAILED {m.scenario.profile} {m.scenario.placement} C={m.scenario.concurrency}:"
        f" {check}: expected {expected}, got {actual}"
        for m in results
        for check, expected, actual, ok in m.checks
        if not ok
    ]


def report(results: list[Measured], ceilings: Ceilings) -> str:
    sections = [
        "## Scenarios",
        "",
        *scenario_table(results, ceilings),
        "",
        "## CPU ms per completed transfer, by process",
        "",
        *cpu_table(results),
        "",
        "## PostgreSQL CPU ms per completed transfer, by the connection its backend serves",
        "",
        *postgres_connections_table(results),
        "",
        "## Memory MiB, RSS (PSS), by process",
        "",
        *memory_table(results),
        "",
        "## Ceilings of this machine, same run",
        "",
        *ceilings_table(ceilings),
        "",
        "## Goals (issue 10)",
        "",
        *goals_table(results),
        *functions_table(results),
        "",
        *failed_checks(results),
    ]
    return "\n".join(sections)


def as_json(results: list[Measured], ceilings: Ceilings) -> dict:
    def one(m: Measured) -> dict:
        return dataclasses.asdict(m) | {
            "transfers_per_second": m.transfers_per_second,
            "server_and_postgres_ms_per_transfer": m.server_and_postgres_ms,
            "ok": m.ok,
        }

    return {
        "cores": ceilings.cores,
        "load_average_at_start": ceilings.load_average_at_start,
        "pgbench_tps": ceilings.pgbench_tps,
        "queue_rate": ceilings.queue_rate and dataclasses.asdict(ceilings.queue_rate),
        "server_settings": ceilings.server_settings,
        "autovacuum_naptime": ceilings.autovacuum_naptime,
        "stand_in": [one(m) for m in ceilings.stand_in],
        "stand_in_at_end": [one(m) for m in ceilings.stand_in_at_end],
        "node_budget_ms": {
            m.scenario.concurrency: ceilings.node_budget_ms(m.scenario.concurrency) for m in ceilings.stand_in
        },
        "scenarios": [one(m) for m in results],
    }


# --- the run ---------------------------------------------------------------------------------

SERVER_SETTINGS = ("autovacuum", "synchronous_commit", "fsync", "shared_buffers", "shared_preload_libraries")


def server_settings(postgres_url: str) -> dict[str, str]:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = conn.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(SERVER_SETTINGS),))
        return dict(rows.fetchall())


def run(options: Options, postgres_url: str, rabbitmq_url: str, log_dir: Path) -> tuple[list[Measured], Ceilings]:
    ceilings = Ceilings(
        cores=len(os.sched_getaffinity(0)),
        load_average_at_start=os.getloadavg(),
        stand_in=run_stand_in(options, rabbitmq_url) if options.stand_in else [],
        queue_rate=run_queue_rate(rabbitmq_url) if options.stand_in else None,
        pgbench_tps=run_pgbench(postgres_url) if options.pgbench else {},
        server_settings=server_settings(postgres_url),
        autovacuum_naptime=options.autovacuum_naptime,
    )
    results = [
        m for profile in options.profiles for m in run_profile(profile, options, postgres_url, rabbitmq_url, log_dir)
    ]
    if options.stand_in:
        ceilings.stand_in_at_end = run_stand_in(options, rabbitmq_url)
    return results, ceilings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    parser.add_argument("--profile", choices=sorted(PROFILES), nargs="+", default=list(defaults.profiles))
    parser.add_argument("--placement", choices=PLACEMENTS, nargs="+", default=list(defaults.placements))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(defaults.concurrencies))
    parser.add_argument("--accounts", type=int, default=defaults.accounts, help="funded accounts (K)")
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="measuring window per scenario")
    parser.add_argument("--warmup-seconds", type=float, default=defaults.warmup_seconds)
    parser.add_argument("--idle-accounts", type=int, default=0, help="run every scenario again with N idle accounts")
    parser.add_argument(
        "--sql-profile", action="store_true", help="track_functions = all; SQL functions and table scans per transfer"
    )
    parser.add_argument(
        "--no-stand-in",
        action="store_true",
        help="leave out the broker's ceilings: the stand-in, a quorum queue's raw rate",
    )
    parser.add_argument("--no-pgbench", action="store_true", help="leave out the pgbench ceiling")
    parser.add_argument(
        "--autovacuum-naptime",
        type=float,
        default=defaults.autovacuum_naptime,
        help="during each scenario, vacuum as autovacuum with this naptime would (benchmarks/autovacuum.py)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()), help="where the node logs")
    args = parser.parse_args()
    options = Options(
        profiles=tuple(args.profile),
        placements=tuple(args.placement),
        concurrencies=tuple(args.concurrency),
        accounts=args.accounts,
        seconds=args.seconds,
        warmup_seconds=args.warmup_seconds,
        idle_accounts=args.idle_accounts,
        sql_profile=args.sql_profile,
        stand_in=not args.no_stand_in,
        pgbench=not args.no_pgbench,
        autovacuum_naptime=args.autovacuum_naptime,
    )
    postgres_url, rabbitmq_url = os.environ["PYSWPT_TEST_POSTGRES_URL"], os.environ["PYSWPT_TEST_RABBITMQ_URL"]
    results, ceilings = run(options, postgres_url, rabbitmq_url, args.log_dir)
    print(report(results, ceilings))
    if args.json:
        args.json.write_text(json.dumps(as_json(results, ceilings), indent=2, default=str))
    return 0 if all(m.ok for m in results + ceilings.stand_in + ceilings.stand_in_at_end) else 1


if __name__ == "__main__":
    sys.exit(main())
