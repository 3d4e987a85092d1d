"""The node's Prometheus metrics: every metric in one place, and the endpoint that serves them.

The drivers count at their existing single points (a window committed, a
burst confirmed, a round done, a pass over a table ended, a request answered)
by calling the metrics defined here; no business rule looks at them.

Multiprocess mode: a node is many processes (`run all`'s drivers and their
forked or spawned workers), so each one writes its values to a file of
PROMETHEUS_MULTIPROC_DIR (pyswpt.metrics_directory prepares it before this
module is imported), and the serving process sums the files of every process,
those of processes that died included: counters never go back. Gauges kept by
a process are `livemostrecent`: the files of a dead process are dropped
(forget_process) when its parent reaps it.

Figures that live in the database (backlogs, oldest ages, parked messages) are
read by the serving process only, at scrape time, through functions that read
a bounded number of rows (sql/functions/96_metrics.sql), and cached for
DATABASE_CACHE_SECONDS so that several scrapers cost one query.

Names follow Prometheus's conventions: a `pyswpt_` prefix, base units in the
name (`_seconds`, `_rows`), `_total` on counters, and labels whose values come
from a short known list, never from message contents (see message_type_label).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from pyswpt import db, messages, metrics_directory, queries, wire

logger = logging.getLogger(__name__)

# `run all` serves the node's metrics here when METRICS_PORT is not set (README, "Metrics").
DEFAULT_METRICS_PORT = 9464
LISTEN_HOST = "0.0.0.0"
DATABASE_CACHE_SECONDS = 5.0
# Rows read per table by one scrape at most; counts beyond it are estimates (96_metrics.sql).
DATABASE_MAX_ROWS_READ = 10_000
# The label of a message type that is not one of the protocol's (a peer may send anything).
OTHER_TYPE = "other"
# What the node consumes, and what it publishes (AccountTransfer is the one type of neither list of wire).
KNOWN_MESSAGE_TYPES = frozenset(
    {*messages.SMP_KINDS, *messages.CHORE_KINDS, *wire.ACCOUNT_MESSAGE_TYPES, *wire.COORDINATOR_MESSAGE_TYPES}
) | {"AccountTransfer"}
# RabbitMQ's name of the default exchange, where chores go: an empty label would mean "no label".
DEFAULT_EXCHANGE = "amq.default"

LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WINDOW_BUCKETS_MESSAGES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
ROUND_BUCKETS_ACCOUNTS = (0, 1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000)
# A flusher round takes up to MAX_ROWS_PER_TRANSACTION (10000) rows a transaction, and goes on until
# its tables are empty.
ROUND_BUCKETS_ROWS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000, 100000)

# Consumers (SMP and chores) --------------------------------------------------------------------

MESSAGES_CONSUMED = Counter(
    "pyswpt_messages_consumed_total",
    "Messages consumed, by queue, type and outcome: applied; ignored (a chore of another shard); "
    "parked (stored in pyswpt.parked_message and dead-lettered); rejected (dead-lettered only: the "
    "cap of parked messages was reached, or parking failed); redelivered (handed back to the broker).",
    ["queue", "type", "outcome"],
)
CONSUMER_WINDOW_MESSAGES = Histogram(
    "pyswpt_consumer_window_messages",
    "Messages per window applied in one transaction.",
    ["queue"],
    buckets=WINDOW_BUCKETS_MESSAGES,
)
CONSUMER_SLOW_WINDOWS = Counter(
    "pyswpt_consumer_slow_windows_total",
    "Windows applied alone that outlasted the hold-back (pyswpt.consuming.HOLD_BACK_SECONDS), so that"
    " the deliveries behind them went to the consumer's other threads.",
    ["queue"],
)
CONSUME_TO_COMMIT_SECONDS = Histogram(
    "pyswpt_consume_to_commit_seconds",
    "From a delivery's arrival at the consumer to the commit of its window, per settled message.",
    ["queue"],
    buckets=LATENCY_BUCKETS_SECONDS,
)
CONSUMER_AT_ONCE = Counter(
    "pyswpt_consumer_at_once_total",
    "What the SMP consumer's windows did at once, and what they left to the workers' stages, by queue,"
    " step and outcome: prepare counts PrepareTransfers answered at once (done) or queued (left);"
    " finalize counts the senders of a window's FinalizeTransfers whose queued requests it finalized"
    " (done) or not (left: the sender was busy or changed, or another transaction held the requests).",
    ["queue", "step", "outcome"],
)
TRANSACTION_RETRIES = Counter(
    "pyswpt_transaction_retries_total",
    "Transactions run again after a serialization failure (40001) or a deadlock (40P01).",
    ["sqlstate"],
)


class AtOnceCounts:
    """CONSUMER_AT_ONCE of one queue, its series looked up once: a window counts on its thread's hot path."""

    def __init__(self, queue: str):
        self.series = {
            (step, outcome): CONSUMER_AT_ONCE.labels(queue, step, outcome)
            for step in ("prepare", "finalize")
            for outcome in ("done", "left")
        }

    def count(self, step: str, done: int, left: int) -> None:
        if done:
            self.series[step, "done"].inc(done)
        if left:
            self.series[step, "left"].inc(left)


# Publishing (flusher, chores, parked retries) ---------------------------------------------------

MESSAGES_PUBLISHED = Counter(
    "pyswpt_messages_published_total",
    "Messages published with publisher confirms, by exchange, type and what the broker did: "
    "confirmed, returned (unroutable) or nacked. Chores go to amq.default.",
    ["exchange", "type", "outcome"],
)
COMMIT_TO_PUBLISH_SECONDS = Histogram(
    "pyswpt_commit_to_publish_seconds",
    "From an outbox row's insertion (its transaction's time) to the broker's confirm of its message.",
    ["table"],
    buckets=LATENCY_BUCKETS_SECONDS,
)
FLUSHER_ROUND_ROWS = Histogram(
    "pyswpt_flusher_round_rows",
    "Outbox rows that left the outbox (published, parked or dropped) in one round of a flusher;"
    " its count is the rounds (at least 5 ms apart: pyswpt.drivers.flusher.ROUND_GAP_SECONDS).",
    buckets=ROUND_BUCKETS_ROWS,
)
OUTBOX_ROWS_PARKED = Counter(
    "pyswpt_outbox_rows_parked_total",
    "Outbox rows the flusher parked instead of publishing, by table and reason code.",
    ["table", "reason"],
)

# Request workers --------------------------------------------------------------------------------

WORKER_ROUNDS = Counter("pyswpt_worker_rounds_total", "Rounds of a worker stage.", ["stage"])
WORKER_ROUND_ACCOUNTS = Histogram(
    "pyswpt_worker_round_accounts",
    "Accounts with queued work processed by one round of a worker stage.",
    ["stage"],
    buckets=ROUND_BUCKETS_ACCOUNTS,
)
WORKER_ROUNDS_HELPED = Counter(
    "pyswpt_worker_rounds_helped_total",
    "Rounds of a worker stage whose own thread could not end them within the hold-back"
    " (pyswpt.drivers.workers.HOLD_BACK_SECONDS) and had the stage's other threads help.",
    ["stage"],
)
WORKER_CALLS_SPLIT = Counter(
    "pyswpt_worker_calls_split_total",
    "Calls of a worker stage for several accounts (pyswpt.drivers.workers.ACCOUNTS_PER_CALL) that"
    " failed, an account's lock waited for past the hold-back, say, so that their accounts went one at a time.",
    ["stage"],
)
WORKER_ACCOUNT_FAILURES = Counter(
    "pyswpt_worker_account_failures_total",
    "Accounts whose processing failed and was put off (backoff per account).",
    ["stage"],
)

# Scanners ---------------------------------------------------------------------------------------

SCANNER_ROWS = Counter("pyswpt_scanner_rows_total", "Rows handed to a scanner's steps.", ["table"])
SCANNER_PASSES = Counter(
    "pyswpt_scanner_passes_total",
    "Whole passes over a table (the first, partial pass after a start is not counted).",
    ["table"],
)
SCANNER_LAST_PASS_SECONDS = Gauge(
    "pyswpt_scanner_last_pass_duration_seconds",
    "How long the last whole pass over the table took.",
    ["table"],
    multiprocess_mode="livemostrecent",
)
SCANNER_PASS_PROGRESS = Gauge(
    "pyswpt_scanner_pass_progress_ratio",
    "How far the scanner is in its pass over the table: heap blocks read over blocks in the table.",
    ["table"],
    multiprocess_mode="livemostrecent",
)
SCANNER_SKIPPED_ROWS = Counter(
    "pyswpt_scanner_skipped_rows_total",
    "Rows a scanner step failed on and skipped for this pass.",
    ["table"],
)

# Fetch API (server) and its client --------------------------------------------------------------

FETCH_API_REQUESTS = Counter(
    "pyswpt_fetch_api_requests_total",
    "Requests answered by the fetch API, by route (its path template) and status code.",
    ["route", "status"],
)
FETCH_API_REQUEST_SECONDS = Histogram(
    "pyswpt_fetch_api_request_duration_seconds",
    "Time to answer a fetch API request.",
    ["route"],
    buckets=LATENCY_BUCKETS_SECONDS,
)
FETCH_CLIENT_CACHE_LOOKUPS = Counter(
    "pyswpt_fetch_client_cache_lookups_total",
    "Lookups in the fetch API client's caches (reachable, root_config), by result: hit or miss.",
    ["cache", "result"],
)

# The supervisor ---------------------------------------------------------------------------------

DRIVER_RESTARTS = Counter(
    "pyswpt_driver_restarts_total", "Drivers that exited and were started again by `pyswpt run all`.", ["driver"]
)


def message_type_label(message_type: str | None) -> str:
    """The AMQP type of a message as a label: a peer may send any text, and every value is a series."""
    return message_type if message_type in KNOWN_MESSAGE_TYPES else OTHER_TYPE


def exchange_label(exchange: str) -> str:
    return exchange or DEFAULT_EXCHANGE


def forget_process(pid: int) -> None:
    """Drop the gauges of a process that has ended and was reaped; its counters stay in the sums."""
    if metrics_directory.is_set():
        mark_process_dead(pid)


# Serving ----------------------------------------------------------------------------------------


class DatabaseCollector:
    """Backlogs, oldest ages and parked messages, read from the database when scraped.

    One connection, opened when needed and dropped after an error; results are
    kept DATABASE_CACHE_SECONDS. When the database cannot be read the figures
    are left out and pyswpt_database_metrics_up is 0: a scrape never fails.
    """

    def __init__(self, postgres_url: str):
        self.postgres_url = postgres_url
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._families: list[GaugeMetricFamily] = []
        self._read_at = float("-inf")

    def describe(self) -> list[GaugeMetricFamily]:
        # Without describe(), registering would call collect(), which reads the database.
        return self.empty_families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            if time.monotonic() - self._read_at >= DATABASE_CACHE_SECONDS:
                self._families = self.read()
                self._read_at = time.monotonic()
            yield from self._families

    def read(self) -> list[GaugeMetricFamily]:
        families = self.empty_families()
        backlog_rows, backlog_age, queue_requests, queue_accounts, queue_age, parked, up, duration = families
        started = time.monotonic()
        try:
            conn = self.connection()
            params = {"max_rows": DATABASE_MAX_ROWS_READ}
            for table, rows, age in conn.execute(queries.OUTBOX_BACKLOG_METRICS, params):
                backlog_rows.add_metric([table], rows)
                backlog_age.add_metric([table], age or 0.0)
            for stage, requests, accounts, age in conn.execute(queries.WORK_QUEUE_METRICS, params):
                queue_requests.add_metric([stage], requests)
                queue_accounts.add_metric([stage], accounts)
                queue_age.add_metric([stage], age or 0.0)
            for source, reason, count in conn.execute(queries.PARKED_MESSAGE_METRICS):
                parked.add_metric([source, reason], count)
        except psycopg.Error as error:
            logger.error("Cannot read the database's metrics: %s", " ".join(str(error).split()))
            self.close()
            *_figures, up, _duration = families = self.empty_families()
            up.add_metric([], 0)
            return families
        up.add_metric([], 1)
        duration.add_metric([], time.monotonic() - started)
        return families

    def connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.postgres_url, application_name="pyswpt metrics", read_only=True)
            self._conn.autocommit = True
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @staticmethod
    def empty_families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "pyswpt_outbox_backlog_rows", "Outbox rows not yet published, per outbox table.", labels=["table"]
            ),
            GaugeMetricFamily(
                "pyswpt_outbox_oldest_row_age_seconds",
                "Age of the oldest outbox row not yet published (0 when none).",
                labels=["table"],
            ),
            GaugeMetricFamily("pyswpt_work_queue_requests", "Requests waiting for a worker stage.", labels=["stage"]),
            GaugeMetricFamily(
                "pyswpt_work_queue_accounts", "Accounts with requests waiting for a worker stage.", labels=["stage"]
            ),
            GaugeMetricFamily(
                "pyswpt_work_queue_oldest_request_age_seconds",
                "How long the oldest request waiting for a worker stage has waited (0 when none).",
                labels=["stage"],
            ),
            GaugeMetricFamily(
                "pyswpt_parked_messages",
                "Messages in pyswpt.parked_message, by source (queue or outbox table) and reason code.",
                labels=["source", "reason"],
            ),
            GaugeMetricFamily(
                "pyswpt_database_metrics_up", "1 when the last read of the database's figures succeeded, else 0."
            ),
            GaugeMetricFamily(
                "pyswpt_database_metrics_read_seconds", "How long the last read of the database's figures took."
            ),
        ]


def node_registry(postgres_url: str | None) -> CollectorRegistry:
    """What one endpoint serves: every process's metrics (when they have a directory), and the database's."""
    registry = CollectorRegistry()
    if metrics_directory.is_set():
        MultiProcessCollector(registry)
    if postgres_url:
        registry.register(DatabaseCollector(postgres_url))
    return registry


def own_registry() -> CollectorRegistry:
    """The metrics of one command run alone and of the processes it forks."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def node_endpoint_port(metrics_port: int | None) -> int:
    """Where a node serves its metrics: METRICS_PORT, or DEFAULT_METRICS_PORT when it is unset."""
    return metrics_port if metrics_port is not None else DEFAULT_METRICS_PORT


def serve(port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serve `registry` at /metrics (any path, in fact) on `port`, from a daemon thread."""
    server, _thread = start_http_server(port, addr=LISTEN_HOST, registry=registry)
    logger.info("Serving metrics on port %d.", port)
    return server


def observe_each(histogram: Histogram, labels: Iterable[str], values: Iterable[float]) -> None:
    """Observe every value in one child of `histogram` (latencies are never negative: clocks differ)."""
    child = histogram.labels(*labels)
    for value in values:
        child.observe(max(0.0, value))
