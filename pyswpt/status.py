"""`pyswpt status` (issue 11): one screen that says whether the node is healthy, and why not.

What it reads, each part on its own, so that a server that does not answer
makes one reason and the other parts are still shown:

- the schema: the migrations of this pyswpt, and which are not applied;
- the SMP queue and the chores queue: ready messages and consumers, by a
  passive declare (which creates nothing);
- from the database, with cheap SQL (sql/functions/97_node_status.sql): the
  outbox backlog and its oldest row per table, the work queues per stage,
  parked messages per source and reason (and those only counted past the
  cap), and each scanner's passes (the table scan_pass, which the scanners
  write about once a minute).

The node is unhealthy, exit status 1 with one line per reason, when a
migration is not applied, a queue is missing, has no consumer or holds more
than APP_STATUS_MAX_QUEUE_MESSAGES, an outbox row waited longer than
APP_STATUS_MAX_OUTBOX_AGE_SECONDS, a work queue holds more than
APP_STATUS_MAX_WORK_QUEUE_ROWS or waited longer than
APP_STATUS_MAX_WORK_QUEUE_AGE_SECONDS, more than APP_STATUS_MAX_PARKED_MESSAGES
are parked (or any was dropped past the cap), or a scanner never ran or wrote
nothing for APP_STATUS_MAX_SCANNER_SILENCE_SECONDS; else exit status 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from pika.exceptions import ChannelClosedByBroker
from psycopg.rows import dict_row

from pyswpt import amqp, db, queries, schema, topology
from pyswpt.config import Config
from pyswpt.drivers.scanners.accounts import AccountsScanner
from pyswpt.drivers.scanners.prepared_transfers import PreparedTransfersScanner
from pyswpt.drivers.scanners.registered_balance_changes import RegisteredBalanceChangesScanner
from pyswpt.transactions import describe_error, with_retries

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
# The tables the three `run scan-*` drivers walk: each should have a row in scan_pass.
SCANNED_TABLES = (
    AccountsScanner.table_name,
    PreparedTransfersScanner.table_name,
    RegisteredBalanceChangesScanner.table_name,
)
# What a part of the report may fail with: a server that does not answer, or refuses.
READ_ERRORS = (psycopg.Error, *amqp.CONNECTION_ERRORS, OSError)

Row = dict[str, Any]


@dataclasses.dataclass
class Report:
    """Every part of the status, and the reasons why the node is not healthy."""

    parts: dict[str, Any] = dataclasses.field(default_factory=dict)
    reasons: list[str] = dataclasses.field(default_factory=list)

    def add(self, name: str, read: Callable[[], Any], judge: Callable[[Any], list[str]]) -> None:
        """Read one part; what it reads is judged, and a failure to read it is a reason too."""
        try:
            self.parts[name] = read()
        except READ_ERRORS as error:
            self.parts[name] = None
            self.reasons.append(f"{name}: cannot read it: {describe_error(error)}")
        else:
            self.reasons += judge(self.parts[name])

    def as_json(self) -> str:
        return json.dumps({"healthy": not self.reasons, "reasons": self.reasons, **self.parts}, indent=2)


def status(config: Config, *, as_json: bool) -> int:
    """Print the node's status (text or JSON); 0 when healthy, 1 when any reason was found."""
    report = collect(config)
    print(report.as_json() if as_json else format_report(report))
    return EXIT_UNHEALTHY if report.reasons else EXIT_HEALTHY


def collect(config: Config) -> Report:
    report = Report()
    report.add("schema", lambda: read_schema(config), judge_schema)
    report.add("queues", lambda: read_queues(config), lambda queues: judge_queues(config, queues))
    try:
        conn = db.connect(config.postgres_url, application_name="pyswpt status")
    except psycopg.Error as error:
        report.reasons.append(f"database: cannot connect: {describe_error(error)}")
        return report
    conn.row_factory = dict_row
    with conn:
        report.add("outbox", lambda: read_rows(conn, queries.OUTBOX_BACKLOG), lambda rows: judge_outbox(config, rows))
        report.add(
            "work_queues", lambda: read_rows(conn, queries.WORK_QUEUES), lambda rows: judge_work_queues(config, rows)
        )
        report.add(
            "parked", lambda: read_rows(conn, queries.COUNT_PARKED_MESSAGES), lambda rows: judge_parked(config, rows)
        )
        report.add("scanners", lambda: read_rows(conn, queries.SCAN_PASSES), lambda rows: judge_scanners(config, rows))
    return report


# Reading ---------------------------------------------------------------------------------------


def read_schema(config: Config) -> Row:
    known, pending, unknown_count = schema.migration_state(config.postgres_url)
    return {
        "migrations": len(known),
        "applied": len(known) - len(pending),
        "pending": pending,
        "unknown": unknown_count,
    }


def read_queues(config: Config) -> list[Row]:
    return [
        read_queue(config.protocol_broker_url, config.protocol_broker_queue, config.protocol_broker_processes > 0),
        read_queue(config.chores_broker_url, config.chores_broker_queue, config.chores_broker_processes > 0),
    ]


def read_queue(url: str, queue: str, consumed: bool) -> Row:
    """Ready messages and consumers of a queue, without creating it; None for both when it is missing."""
    found: Row = {"queue": queue, "exists": False, "messages": None, "consumers": None, "consumed": consumed}
    with topology.open_channel(url) as channel, quiet_channel_close():
        try:
            declared = channel.queue_declare(queue, passive=True)
        except ChannelClosedByBroker as error:
            if error.reply_code != topology.NOT_FOUND:
                raise
            return found
    return {
        **found,
        "exists": True,
        "messages": declared.method.message_count,
        "consumers": declared.method.consumer_count,
    }


@contextlib.contextmanager
def quiet_channel_close() -> Iterator[None]:
    """pika logs a WARNING when the broker closes a channel; a missing queue is already a reason here."""
    channel_logger = logging.getLogger("pika.channel")
    level = channel_logger.level
    channel_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        channel_logger.setLevel(level)


def read_rows(conn: psycopg.Connection, query: str) -> list[Row]:
    rows = with_retries(conn, lambda c: c.execute(query).fetchall())
    return [{name: json_value(value) for name, value in row.items()} for row in rows]


def json_value(value: Any) -> Any:
    """Ages in seconds, times in ISO 8601: what a script reads without a date library."""
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


# Judging ---------------------------------------------------------------------------------------


def judge_schema(found: Row) -> list[str]:
    if found["pending"]:
        return [f"schema: migrations not applied: {', '.join(found['pending'])} (run pyswpt configure)"]
    return []


def judge_queues(config: Config, queues: list[Row]) -> list[str]:
    reasons = []
    for queue in queues:
        name = queue["queue"]
        if not queue["exists"]:
            reasons.append(f"queue {name}: does not exist (run pyswpt configure, or pyswpt subscribe)")
            continue
        if queue["consumed"] and queue["consumers"] == 0:
            reasons.append(f"queue {name}: no consumer (is the node running?)")
        if queue["messages"] > config.status_max_queue_messages:
            reasons.append(
                f"queue {name}: {queue['messages']} messages waiting, more than "
                f"APP_STATUS_MAX_QUEUE_MESSAGES={config.status_max_queue_messages}"
            )
    return reasons


def judge_outbox(config: Config, rows: list[Row]) -> list[str]:
    limit = config.status_max_outbox_age_seconds
    return [
        f"outbox {row['outbox_table']}: {row['row_count']} {row['message_type']} messages unsent, the oldest for "
        f"{format_seconds(row['oldest_age'])}, longer than APP_STATUS_MAX_OUTBOX_AGE_SECONDS={limit:g} "
        "(is the flusher running, and the broker taking them?)"
        for row in rows
        if row["oldest_age"] is not None and row["oldest_age"] > limit
    ]


def judge_work_queues(config: Config, rows: list[Row]) -> list[str]:
    reasons = []
    for row in rows:
        if row["row_count"] > config.status_max_work_queue_rows:
            reasons.append(
                f"work queue {row['stage']}: {row['row_count']} requests, more than "
                f"APP_STATUS_MAX_WORK_QUEUE_ROWS={config.status_max_work_queue_rows} (are the workers running?)"
            )
        if row["oldest_age"] is not None and row["oldest_age"] > config.status_max_work_queue_age_seconds:
            reasons.append(
                f"work queue {row['stage']}: the oldest request is {format_seconds(row['oldest_age'])} old, more than "
                f"APP_STATUS_MAX_WORK_QUEUE_AGE_SECONDS={config.status_max_work_queue_age_seconds:g} "
                "(are the workers running?)"
            )
    return reasons


def judge_parked(config: Config, rows: list[Row]) -> list[str]:
    parked_count = sum(row["parked_count"] for row in rows)
    dropped_count = sum(row["dropped_count"] for row in rows)
    reasons = []
    if parked_count > config.status_max_parked_messages:
        counts = ", ".join(
            f"{row['source_name']} {row['reason_code']}: {row['parked_count']}" for row in rows if row["parked_count"]
        )
        reasons.append(f"parked: {parked_count} messages ({counts}); see pyswpt parked list")
    if dropped_count:
        reasons.append(f"parked: {dropped_count} more messages dropped over the cap per reason")
    return reasons


def judge_scanners(config: Config, rows: list[Row]) -> list[str]:
    by_table = {row["table_name"]: row for row in rows}
    limit = config.status_max_scanner_silence_seconds
    reasons = []
    for table_name in SCANNED_TABLES:
        row = by_table.get(table_name)
        if row is None:
            reasons.append(f"scanner {table_name}: has never run")
        elif row["recorded_age"] > limit:
            reasons.append(
                f"scanner {table_name}: silent for {format_seconds(row['recorded_age'])}, longer than "
                f"APP_STATUS_MAX_SCANNER_SILENCE_SECONDS={limit:g} (is it running?)"
            )
    return reasons


# Printing --------------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    verdict = "UNHEALTHY" if report.reasons else "healthy"
    lines = [f"pyswpt status: {verdict}", *(f"  ! {reason}" for reason in report.reasons), ""]
    formatters = {
        "schema": format_schema,
        "queues": format_queues,
        "outbox": format_outbox,
        "work_queues": format_work_queues,
        "parked": format_parked,
        "scanners": format_scanners,
    }
    for name, format_part in formatters.items():
        if report.parts.get(name) is not None:
            lines += section(name, format_part(report.parts[name]))
    return "\n".join(lines)


def section(title: str, lines: list[str]) -> list[str]:
    """The title in a column of its own before the first line."""
    return [f"{title if n == 0 else '':<12}{line}" for n, line in enumerate(lines or ["-"])]


def format_schema(found: Row) -> list[str]:
    line = f"{found['applied']} of {found['migrations']} migrations applied"
    if found["unknown"]:
        line += f"; {found['unknown']} more applied by a newer pyswpt"
    return [line]


def format_queues(queues: list[Row]) -> list[str]:
    return [
        f"{queue['queue']:<32} "
        + (f"{queue['messages']} messages, {queue['consumers']} consumers" if queue["exists"] else "missing")
        for queue in queues
    ]


def format_outbox(rows: list[Row]) -> list[str]:
    waiting = [row for row in rows if row["row_count"]]
    return [
        f"{row['outbox_table']:<32} {row['row_count']} unsent, the oldest for {format_seconds(row['oldest_age'])}"
        for row in waiting
    ] or ["empty"]


def format_work_queues(rows: list[Row]) -> list[str]:
    return [
        f"{row['stage']:<32} {row['row_count']} requests of {row['account_count']} accounts"
        + (f", the oldest {format_seconds(row['oldest_age'])} old" if row["oldest_age"] is not None else "")
        for row in rows
    ]


def format_parked(rows: list[Row]) -> list[str]:
    return [
        f"{row['source_name'] + ' ' + row['reason_code']:<32} {row['parked_count']} parked"
        + (f", {row['dropped_count']} dropped over the cap" if row["dropped_count"] else "")
        for row in rows
    ] or ["none"]


def format_scanners(rows: list[Row]) -> list[str]:
    return [format_scanner(row) for row in sorted(rows, key=lambda row: row["table_name"])]


def format_scanner(row: Row) -> str:
    estimate = row["pass_row_estimate"]
    done = f"{row['pass_rows_done']} of ~{estimate} rows" if estimate else f"{row['pass_rows_done']} rows"
    line = f"{row['table_name']:<32} pass of {format_seconds(row['pass_seconds'])}: {done}"
    if row["last_pass_ended_at"] is None:
        line += ", no pass finished yet"
    else:
        line += (
            f"; the last ended {format_seconds(row['last_pass_age'])} ago after "
            f"{format_seconds(row['last_pass_duration'])}, {row['last_pass_rows']} rows"
        )
    return line + f"; last heard of {format_seconds(row['recorded_age'])} ago"


def format_seconds(seconds: float | None) -> str:
    """A duration as an operator reads it: 45 s, 12 min, 3.5 h, 2.0 d."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
