"""The outbox flusher (`pyswpt run flusher`): publishes outbox rows to RabbitMQ.

Per round: take up to a burst of rows of each table to flush (deleted in one
open transaction, as many tables as MAX_ROWS_PER_TRANSACTION allows, their
takes sent together with BEGIN), make the commits that wrote them durable
where those were asynchronous (the workers', see pyswpt.db), publish them all
as one batch with publisher confirms, commit; again for the tables whose burst
was full or that were not reached. One transaction and one wait for confirms
serve the tables of a round: a transfer fills three to five tables, and a wait
per table cost a commit and a broker round trip each.
A round starts when a NOTIFY says rows arrived, but not sooner than
ROUND_GAP_SECONDS after the last one started, and flushes the tables named
by the NOTIFYs until then; at least every FLUSH_PERIOD seconds a round
flushes every table and retries the parked messages that are due.

One row never holds up the others (issue 8): a row that cannot be read,
encoded or published (unroutable or nacked), or that belongs to another
shard, is parked (pyswpt.parking) and logged in the transaction that deletes
the confirmed rows, so a confirmed row is never published again. Parked
messages that a later attempt may deliver are republished with backoff.
A lost connection or missing confirms roll the burst back (delivery is at
least once) and the flusher reconnects with backoff; so does a missing SQL
function while an upgrade runs, up to APP_API_WAIT_SECONDS (pyswpt.upgrades).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pika
import psycopg
from psycopg.pq.abc import PGresult
from psycopg.rows import dict_row

from pyswpt import amqp, db, metrics, outbox, parking, processes, queries, wire
from pyswpt.backoff import Backoff
from pyswpt.config import Config
from pyswpt.transactions import describe_error, is_infrastructure_error, retrying, transaction_begun_in_block
from pyswpt.upgrades import ApiWait

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "pyswpt_outbox"

# Errors that the data of one row causes while it is loaded or encoded
# (a timestamp past year 9999, a float JSON cannot carry, a missing value).
ROW_ERRORS = (psycopg.DataError, ValueError, TypeError, OverflowError)

# An unroutable or nacked message is published again after this pause, then
# after twice the previous pause (postpone_parked_retry), at most MAX_RETRY_PAUSE_SECONDS.
FIRST_RETRY_PAUSE_SECONDS = 1.0
MAX_RETRY_PAUSE_SECONDS = 3600.0
# Parked messages republished per round, so that retries never crowd out the outbox.
MAX_RETRIES_PER_ROUND = 100
# A transaction takes at most this many rows, counting every burst it sends for as full: a
# failure replays what one transaction took. The tables that do not fit wait for the next one.
MAX_ROWS_PER_TRANSACTION = 10000
# Rounds start at least this far apart. A round costs about as much as the
# messages of a few transfers (its takes, commit and wait for confirms), and
# without a gap a busy node starts one for every commit of a stage: at 20
# coordinators, measured, 0.4 rounds per transfer. With it the rows of a few
# milliseconds go out together, and the broker and the peers receive them in
# fewer, larger reads too. Each row waits for the next round, so the gap is
# also on every answer's way: with 20 coordinators 5 ms instead of 10 took
# 3.5 ms off the way back from the ledger (the end-to-end benchmark), for a
# tenth more of the flusher's backend CPU and no more CPU per transfer in all.
ROUND_GAP_SECONDS = 0.005

UNREADABLE = "unreadable"
UNENCODABLE = "unencodable"
FOREIGN_SHARD = "foreign_shard"
UNROUTABLE = "unroutable"
NACKED = "nacked"
REASON_CODE_OF_OUTCOME = {amqp.Outcome.RETURNED: UNROUTABLE, amqp.Outcome.NACKED: NACKED}
REASON_OF_OUTCOME = {
    amqp.Outcome.RETURNED: "the broker returned it: no queue is bound for it",
    amqp.Outcome.NACKED: "the broker nacked it",
}


def run(config: Config, table_names: Sequence[str] | None = None) -> int:
    tables = [outbox.TABLES_BY_NAME[name] for name in table_names] if table_names else list(outbox.TABLES)
    announce(config, tables)
    return processes.run_worker_processes(config.flush_processes, flush_until_stopped, config, tables)


def run_in_thread(config: Config, stopping: threading.Event) -> None:
    """The flusher as `run all` runs it with one process: every table, in a thread of the
    supervisor, until `stopping` is set."""
    tables = list(outbox.TABLES)
    announce(config, tables)
    flush_until_stopped(config, tables, stopping)


def announce(config: Config, tables: list[outbox.OutboxTable]) -> None:
    logger.info(
        "Starting the flusher: processes %d, tables %s, a round at least every %g s.",
        config.flush_processes,
        ", ".join(table.name for table in tables),
        config.flush_period_seconds,
    )


def flush_until_stopped(config: Config, tables: list[outbox.OutboxTable], stopping: threading.Event) -> None:
    """One flusher process: rounds over `tables` until `stopping` is set, reconnecting after failures.

    Raises ApiUnavailable when its SQL API stays missing too long.
    """
    backoff = Backoff()
    api_wait = ApiWait(config.api_wait_seconds, "the flusher")
    while not stopping.is_set():
        try:
            flush_rounds(config, tables, api_wait, stopping)
            return
        except Exception as error:
            if not is_lost_connection(error):
                raise
            api_wait.failed(error)
            pause = backoff.next_pause()
            logger.error(
                "Lost a connection, confirms or a SQL function while flushing (%s); the burst stays in the "
                "outbox. Reconnecting in %.0f s.",
                describe_error(error),
                pause,
            )
            stopping.wait(pause)


def is_lost_connection(error: Exception) -> bool:
    """A server, the network or the SQL API failed, not a row: nothing is parked, the burst rolls back."""
    return isinstance(error, amqp.CONNECTION_ERRORS) or is_infrastructure_error(error)


def flush_rounds(
    config: Config, tables: list[outbox.OutboxTable], api_wait: ApiWait, stopping: threading.Event
) -> None:
    publisher = amqp.BatchPublisher(config.protocol_broker_url)
    try:
        with connections(config.driver_postgres_url) as (conn, listener):
            # A random first pause keeps flushers started together from polling in
            # lockstep; a NOTIFY still wakes them at once.
            next_full_round = time.monotonic() + random.uniform(0, config.flush_period_seconds)
            notified = db.wait_for_notifications(listener, next_full_round, stopping)
            while not stopping.is_set():
                # A round woken by NOTIFYs flushes the tables they name; every
                # FLUSH_PERIOD a full round flushes every table and retries parked
                # messages, so that nothing waits longer for a NOTIFY that was lost.
                round_started = time.monotonic()
                full_round = round_started >= next_full_round
                flushed = [t for t in tables if full_round or t.signal_table in notified]
                metrics.FLUSHER_ROUND_ROWS.observe(flush_tables(conn, listener, publisher, flushed, config))
                if full_round:
                    retry_parked_messages(conn, publisher, tables)
                    next_full_round = round_started + config.flush_period_seconds
                api_wait.succeeded()
                publisher.keep_alive()
                notified = db.wait_for_notifications(
                    listener, next_full_round, stopping, not_before=round_started + ROUND_GAP_SECONDS
                )
    finally:
        publisher.close()


@contextlib.contextmanager
def connections(url: str) -> Iterator[tuple[psycopg.Connection, psycopg.Connection]]:
    """The flusher's two sessions: one for its transactions, and one that LISTENs for NOTIFYs
    and runs the durability barriers, each a transaction of its own. Both are in autocommit:
    the first begins its transactions itself (transaction_begun_in_block).

    The transactions commit asynchronously (pyswpt.db): an undone one only
    publishes its rows again, and the next barrier makes it durable.
    """
    with (
        db.connect(url, application_name="pyswpt flusher", asynchronous_commit=True) as conn,
        db.listen(url, NOTIFY_CHANNEL, application_name="pyswpt flusher listen") as listener,
    ):
        conn.autocommit = True
        yield conn, listener


# Flushing an outbox table --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TakenRow:
    """One row taken from an outbox table, loaded into Python if it could be."""

    values: dict[str, Any] | None  # None: the row could not be loaded (see load_error)
    text: Callable[[], dict[str, str | None]]  # its columns as PostgreSQL text, for parking it
    load_error: str | None = None

    def field(self, column: str) -> Any:
        return self.values[column] if self.values is not None else self.text()[column]


@dataclasses.dataclass(frozen=True)
class SetAside:
    """A row to park, and what names it in the log."""

    parcel: parking.Parcel
    row_key: str


@dataclasses.dataclass
class Burst:
    """The rows of one table taken in a burst, and what became of them."""

    table: outbox.OutboxTable
    rows: list[TakenRow]
    set_aside: list[SetAside] = dataclasses.field(default_factory=list)
    outgoing: list[tuple[TakenRow, amqp.OutgoingMessage]] = dataclasses.field(default_factory=list)
    published: list[TakenRow] = dataclasses.field(default_factory=list)


def flush_tables(
    conn: psycopg.Connection,
    barrier_conn: psycopg.Connection,
    publisher: amqp.BatchPublisher,
    tables: Sequence[outbox.OutboxTable],
    config: Config,
) -> int:
    """Publish the tables' rows in bursts until each is empty; return how many rows left the outbox.

    `barrier_conn`, another session in autocommit, makes the commits that
    wrote the rows durable before they are published.

    A row leaves the outbox when the broker confirmed it, when it is parked, or
    when it belongs to a parent shard and is to be dropped.
    """
    taken_counts = dict.fromkeys((table.name for table in tables), 0)
    parked_counts = dict.fromkeys((table.name for table in tables), 0)
    pending = list(tables)
    while pending:
        # At REPEATABLE READ two flushers racing for a row fail with 40001 in
        # the takes, before anything is published: the bursts are taken again.
        bursts = retrying(functools.partial(publish_bursts, conn, barrier_conn, publisher, pending, config))
        unreached = pending[len(bursts) :]
        pending = []
        for burst in bursts:
            name = burst.table.name
            for item in burst.set_aside:
                log_parked(item)
            count_burst(burst.table, burst.set_aside, burst.published)
            taken_counts[name] += len(burst.rows)
            parked_counts[name] += len(burst.set_aside)
            if len(burst.rows) == config.flush_burst_counts[name]:
                pending.append(burst.table)
            elif taken_counts[name]:
                logger.info("Flushed %d %s (%d of them parked).", taken_counts[name], name, parked_counts[name])
        # A full table's next burst still goes before the tables not reached: the order of `tables` holds.
        pending += unreached
    return sum(taken_counts.values())


def publish_bursts(
    conn: psycopg.Connection,
    barrier_conn: psycopg.Connection,
    publisher: amqp.BatchPublisher,
    tables: Sequence[outbox.OutboxTable],
    config: Config,
) -> list[Burst]:
    """In a transaction of its own, take a burst of the first `tables`, publish them together and
    park what cannot go; return the bursts, one for each table reached (MAX_ROWS_PER_TRANSACTION).

    The transaction's commit deletes the rows taken. Its first statement reads
    the WAL position past every commit its snapshot sees, the commits of the
    rows it takes among them. Every row is taken before anything is published,
    so that a serialization failure comes first. Then, when a row came from an
    asynchronous commit, the barrier: it returns once the WAL is flushed
    through that position. The messages go out in the order of `tables`, each
    table's in the order taken.
    """
    with transaction_begun_in_block(conn):
        snapshot_position, bursts = take_group(conn, next_take_group(tables, 0, config), config, begin=True)
        while group := next_take_group(tables[len(bursts) :], sum(len(burst.rows) for burst in bursts), config):
            bursts += take_group(conn, group, config)[1]
        for burst in bursts:
            sort_rows(burst, config)
        if not all(flushed_at_commit(row) for burst in bursts for row in burst.rows):
            barrier_conn.execute(queries.MAKE_COMMITS_DURABLE, {"through": snapshot_position})
        publish_and_park(conn, publisher, bursts)
        return bursts


def flushed_at_commit(row: TakenRow) -> bool:
    """Whether the row's commit was on disk before the flusher could see it (a consumer's
    synchronous commit, migration 0016): then it needs no barrier. A row that could not be
    loaded is not known to be."""
    return row.values is not None and row.values["flushed_at_commit"]


def publish_and_park(conn: psycopg.Connection, publisher: amqp.BatchPublisher, bursts: list[Burst]) -> None:
    """Publish the bursts' messages as one batch; park, in the caller's transaction, what the
    broker would not take and what was set aside."""
    outcomes = publisher.publish_each([message for burst in bursts for _row, message in burst.outgoing])
    retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=FIRST_RETRY_PAUSE_SECONDS)
    start = 0
    for burst in bursts:
        end = start + len(burst.outgoing)
        settle_outcomes(burst, outcomes[start:end], retry_at)
        start = end
        for item in burst.set_aside:
            parking.park(conn, item.parcel)


def next_take_group(tables: Sequence[outbox.OutboxTable], taken_count: int, config: Config) -> list[outbox.OutboxTable]:
    """The next tables to take from in one round trip: as many as fit in MAX_ROWS_PER_TRANSACTION
    with the `taken_count` rows taken so far, were each burst full. While nothing is taken,
    a group has at least one table, whatever its burst count."""
    group: list[outbox.OutboxTable] = []
    planned = taken_count
    for table in tables:
        planned += config.flush_burst_counts[table.name]
        if planned > MAX_ROWS_PER_TRANSACTION and (group or taken_count):
            break
        group.append(table)
    return group


def take_group(
    conn: psycopg.Connection, tables: Sequence[outbox.OutboxTable], config: Config, *, begin: bool = False
) -> tuple[str | None, list[Burst]]:
    """A burst of each table, in one query; with `begin`, after BEGIN and the WAL position of the
    transaction's snapshot, which the query also returns."""
    head = [("BEGIN", {}), (queries.CURRENT_WAL_POSITION, {})] if begin else []
    takes = [(table.take_query, {"max_count": config.flush_burst_counts[table.name]}) for table in tables]
    with psycopg.ClientCursor(conn, row_factory=dict_row) as cursor:
        cursor.execute(joined(cursor, head + takes))
        position = None
        if begin:
            cursor.nextset()
            position = cursor.fetchone()["current_wal_position"]
            cursor.nextset()
        bursts = [Burst(tables[0], load_rows(cursor))]
        for table in tables[1:]:
            cursor.nextset()
            bursts.append(Burst(table, load_rows(cursor)))
        return position, bursts


def joined(cursor: psycopg.ClientCursor, statements: list[tuple[str, dict[str, int]]]) -> str:
    """The statements as one query of the simple protocol: one message and one round trip, where
    psycopg's pipeline mode also costs one send and one poll per statement. Their parameters
    are bound by psycopg (mogrify), and the protocol allows none in a query of several statements."""
    return ";".join(cursor.mogrify(statement, params) for statement, params in statements)


def count_burst(table: outbox.OutboxTable, set_aside: list[SetAside], published: list[TakenRow]) -> None:
    """The metrics of a committed burst: rows parked, and how long each published row waited."""
    for item in set_aside:
        metrics.OUTBOX_ROWS_PARKED.labels(table.name, item.parcel.reason_code).inc()
    now = dt.datetime.now(dt.UTC)
    metrics.observe_each(
        metrics.COMMIT_TO_PUBLISH_SECONDS,
        [table.name],
        ((now - row.values["inserted_at"]).total_seconds() for row in published),
    )


def sort_rows(burst: Burst, config: Config) -> None:
    """The burst's messages to publish, and the rows to park with their reasons; a parent shard's rows go."""
    table = burst.table
    for row in burst.rows:
        if row.values is None:
            burst.set_aside.append(set_aside_row(row, table, UNREADABLE, f"cannot be read: {row.load_error}"))
            continue
        owner = owner_of(row.values, table, config)
        if owner == "parent":
            continue
        try:
            message = message_of(row.values, table, config)
        except ROW_ERRORS as error:
            reason = f"cannot be encoded: {type(error).__name__}: {error}"
            burst.set_aside.append(set_aside_row(row, table, UNENCODABLE, reason))
            continue
        if owner == "foreign":
            reason = "the shard is not responsible for this account"
            burst.set_aside.append(set_aside_row(row, table, FOREIGN_SHARD, reason, message))
            continue
        burst.outgoing.append((row, message))


def settle_outcomes(burst: Burst, outcomes: list[amqp.Outcome], retry_at: dt.datetime) -> None:
    """The confirmed rows are published; the returned and nacked ones are parked, to be retried at `retry_at`."""
    for (row, message), outcome in zip(burst.outgoing, outcomes, strict=True):
        if outcome is amqp.Outcome.CONFIRMED:
            burst.published.append(row)
        else:
            reason_code, reason = REASON_CODE_OF_OUTCOME[outcome], REASON_OF_OUTCOME[outcome]
            burst.set_aside.append(set_aside_row(row, burst.table, reason_code, reason, message, retry_at))


def owner_of(row: dict, table: outbox.OutboxTable, config: Config) -> str:
    """'shard' when the row is this shard's; 'parent' for a parent shard's row that is to be
    dropped; 'foreign' for any other."""
    if not table.shard_checked:
        return "shard"
    debtor_id, creditor_id = row["debtor_id"], row[table.creditor_column]
    if config.realm.owns(debtor_id, creditor_id):
        return "shard"
    if config.delete_parent_shard_records and config.realm.parent_owns(debtor_id, creditor_id):
        return "parent"
    return "foreign"


def message_of(row: dict, table: outbox.OutboxTable, config: Config) -> amqp.OutgoingMessage:
    """The AMQP message of an outbox row; raises one of ROW_ERRORS if the row has none."""
    fields = table.to_fields(row, config)
    message_type = fields["type"]
    exchange, routing_key, mandatory = wire.destination(message_type, fields)
    return amqp.OutgoingMessage(
        exchange=exchange,
        routing_key=routing_key,
        body=wire.smp_body(fields),
        properties=wire.smp_properties(message_type, fields),
        mandatory=mandatory,
    )


def set_aside_row(
    row: TakenRow,
    table: outbox.OutboxTable,
    reason_code: str,
    reason: str,
    message: amqp.OutgoingMessage | None = None,
    next_retry_at: dt.datetime | None = None,
) -> SetAside:
    """The parcel of a row: its message when there is one, else its columns as text."""
    debtor_id, creditor_id = (as_id(row.field(column)) for column in ("debtor_id", table.creditor_column))
    parcel = parking.Parcel(
        source_kind=parking.SOURCE_OUTBOX,
        source_name=table.name,
        # A row without a message has no routing key; the empty one says so.
        routing_key=message.routing_key if message else "",
        reason_code=reason_code,
        reason=reason,
        body=message.body if message else None,
        row_data=None if message else row.text(),
        exchange=message.exchange if message else None,
        message_type=message.properties.type if message else None,
        content_type=message.properties.content_type if message else None,
        headers=message.properties.headers if message else None,
        debtor_id=debtor_id,
        creditor_id=creditor_id,
        next_retry_at=next_retry_at,
    )
    row_key = f"key ({', '.join(table.key_columns)})=({', '.join(str(row.field(c)) for c in table.key_columns)})"
    return SetAside(parcel, row_key)


def as_id(value: Any) -> int | None:
    """An account id from a loaded row (int) or from a row as text; None if it is not one."""
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def log_parked(item: SetAside) -> None:
    parcel = item.parcel
    retried = parcel.next_retry_at is not None
    logger.log(
        logging.WARNING if retried else logging.ERROR,
        "Parked a %s row (debtor %s, creditor %s, %s): %s: %s; %s.",
        parcel.source_name,
        parcel.debtor_id,
        parcel.creditor_id,
        item.row_key,
        parcel.reason_code,
        parcel.reason,
        "it will be retried" if retried else "only an operator can help",
        extra={
            "table": parcel.source_name,
            "debtor_id": parcel.debtor_id,
            "creditor_id": parcel.creditor_id,
            "message_type": parcel.message_type,
            "reason_code": parcel.reason_code,
        },
    )


def load_rows(cursor: psycopg.Cursor) -> list[TakenRow]:
    """The rows of the cursor's current result (a take), loaded one by one, so that one that Python
    cannot load (a timestamp past year 9999) is kept as text instead of failing the burst."""
    return [load_row(cursor, index) for index in range(cursor.pgresult.ntuples)]


def load_row(cursor: psycopg.Cursor, index: int) -> TakenRow:
    text = functools.partial(row_text, cursor.pgresult, index, cursor.connection.info.encoding)
    cursor.scroll(index, mode="absolute")
    try:
        return TakenRow(cursor.fetchone(), text)
    except ROW_ERRORS as error:
        return TakenRow(None, text, f"{unloadable_column(cursor, index)} ({type(error).__name__})")


def row_text(result: PGresult, index: int, encoding: str) -> dict[str, str | None]:
    """Row `index` of a result in text format (psycopg's default): every column as PostgreSQL wrote it."""
    values = (result.get_value(index, column) for column in range(result.nfields))
    return {
        result.fname(column).decode(encoding): None if value is None else bytes(value).decode(encoding)
        for column, value in enumerate(values)
    }


def unloadable_column(cursor: psycopg.Cursor, index: int) -> str:
    """Which column of row `index` Python cannot load: the error message would show its value."""
    result = cursor.pgresult
    for column in range(result.nfields):
        value = result.get_value(index, column)
        if value is None:
            continue
        oid = result.ftype(column)
        loader = cursor.adapters.get_loader(oid, result.fformat(column))(oid, cursor)
        try:
            loader.load(value)
        except ROW_ERRORS:
            return f"column {result.fname(column).decode(cursor.connection.info.encoding)}"
    return "a column"


# Retrying parked messages ---------------------------------------------------------------------


def retry_parked_messages(
    conn: psycopg.Connection, publisher: amqp.BatchPublisher, tables: Sequence[outbox.OutboxTable]
) -> int:
    """Publish again the due parked messages of `tables`; forget the confirmed ones,
    postpone the others. Returns how many were delivered."""
    with conn.transaction():
        with conn.cursor(row_factory=dict_row) as cursor:
            params = {"source_names": [table.name for table in tables], "max_count": MAX_RETRIES_PER_ROUND}
            parked = cursor.execute(queries.TAKE_DUE_PARKED_RETRIES, params).fetchall()
        if not parked:
            return 0
        outcomes = publisher.publish_each([message_of_parked(row) for row in parked])
        delivered = [
            row["parked_id"] for row, outcome in zip(parked, outcomes, strict=True) if outcome is amqp.Outcome.CONFIRMED
        ]
        conn.execute(queries.DISCARD_PARKED_MESSAGES, {"parked_ids": delivered})
        for row, outcome in zip(parked, outcomes, strict=True):
            if outcome is not amqp.Outcome.CONFIRMED:
                reason = f"retry {row['attempts']}: {REASON_OF_OUTCOME[outcome]}"
                params = {"parked_id": row["parked_id"], "reason": reason, "max_pause_seconds": MAX_RETRY_PAUSE_SECONDS}
                conn.execute(queries.POSTPONE_PARKED_RETRY, params)
    logger.info(
        "Retried %d parked outgoing messages: %d delivered, %d postponed.",
        len(parked),
        len(delivered),
        len(parked) - len(delivered),
    )
    return len(delivered)


def message_of_parked(row: dict) -> amqp.OutgoingMessage:
    """A parked outgoing message as it was first published (spec 01 §3.1 properties).

    Only mandatory messages can be returned; a nacked one is retried as
    mandatory too, so that a retry never drops it silently.
    """
    return amqp.OutgoingMessage(
        exchange=row["exchange"],
        routing_key=row["routing_key"],
        body=bytes(row["body"]),
        properties=pika.BasicProperties(
            content_type=row["content_type"],
            type=row["message_type"],
            delivery_mode=wire.PERSISTENT_DELIVERY_MODE,
            app_id=wire.APP_ID,
            headers=row["headers"],
        ),
        mandatory=True,
    )
