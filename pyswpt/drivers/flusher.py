"""The outbox flusher (`pyswpt run flusher`): publishes outbox rows to RabbitMQ.

Per table and round: take up to a burst of rows (deleted in an open
transaction), publish them as one batch with publisher confirms, commit. A
failed publish rolls back, so the rows stay and are sent again later:
delivery is at least once. Rounds start when a NOTIFY says rows arrived, and
at least every FLUSH_PERIOD seconds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pyswpt import amqp, db, outbox, processes, wire
from pyswpt.config import Config
from pyswpt.transactions import with_retries

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "pyswpt_outbox"


class ForeignRowError(Exception):
    """An outbox row belongs to an account this shard does not own."""


def run(config: Config, table_names: Sequence[str] | None = None) -> int:
    tables = [outbox.TABLES_BY_NAME[name] for name in table_names] if table_names else list(outbox.TABLES)
    return processes.run_worker_processes(config.flush_processes, flush_until_stopped, config, tables)


def flush_until_stopped(config: Config, tables: list[outbox.OutboxTable], stopping: threading.Event) -> None:
    """One flusher process: rounds over `tables` until `stopping` is set."""
    publisher = amqp.BatchPublisher(config.protocol_broker_url)
    try:
        with (
            db.connect(config.postgres_url, application_name="pyswpt flusher") as conn,
            db.listen(config.postgres_url, NOTIFY_CHANNEL, application_name="pyswpt flusher listen") as listener,
        ):
            # A random first pause keeps flushers started together from polling in
            # lockstep; a NOTIFY still wakes them at once.
            first_round = time.monotonic() + random.uniform(0, config.flush_period_seconds)
            db.wait_for_notification(listener, first_round, stopping)
            while not stopping.is_set():
                round_started = time.monotonic()
                for table in tables:
                    flush_table_or_log(conn, publisher, table, config)
                publisher.keep_alive()
                db.wait_for_notification(listener, round_started + config.flush_period_seconds, stopping)
    finally:
        publisher.close()


def flush_table_or_log(
    conn: psycopg.Connection, publisher: amqp.BatchPublisher, table: outbox.OutboxTable, config: Config
) -> None:
    """Flush one table; a refused burst stays in the outbox and the other tables go on.

    The reference ends the whole flusher here, so one unroutable message stops
    every table; here it holds back only its own table until a route exists.
    """
    try:
        flush_table(conn, publisher, table, config)
    except (amqp.PublishError, ForeignRowError) as error:
        logger.error("Caught error while sending pending %s: %s", table.name, error)


def flush_table(
    conn: psycopg.Connection, publisher: amqp.BatchPublisher, table: outbox.OutboxTable, config: Config
) -> int:
    """Publish the table's rows in bursts until it is empty; return how many were sent."""
    burst = config.flush_burst_counts[table.name]
    sent = 0
    while True:
        # At REPEATABLE READ two flushers racing for a row fail with 40001 in
        # take_rows, before anything is published: the burst is taken again.
        rows = with_retries(conn, lambda c: publish_burst(c, publisher, table, burst, config))
        sent += len(rows)
        if len(rows) < burst:
            if sent:
                logger.info("Flushed %d %s.", sent, table.name)
            return sent


def publish_burst(
    conn: psycopg.Connection, publisher: amqp.BatchPublisher, table: outbox.OutboxTable, max_count: int, config: Config
) -> list[dict]:
    """Take up to `max_count` rows in the caller's transaction and publish them; its commit deletes them."""
    rows = take_rows(conn, table, max_count)
    messages = [message_of(row, table, config) for row in rows]
    publisher.publish([m for m in messages if m is not None])
    return rows


def take_rows(conn: psycopg.Connection, table: outbox.OutboxTable, max_count: int) -> list[dict]:
    query = sql.SQL("SELECT * FROM pyswpt.{}(%s)").format(sql.Identifier(table.take_function))
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(query, (max_count,)).fetchall()


def message_of(row: dict, table: outbox.OutboxTable, config: Config) -> amqp.OutgoingMessage | None:
    """The AMQP message of an outbox row; None for a parent shard's row that is to be dropped."""
    if table.shard_checked:
        debtor_id, creditor_id = row["debtor_id"], row[table.creditor_column]
        if not config.realm.owns(debtor_id, creditor_id):
            if config.delete_parent_shard_records and config.realm.parent_owns(debtor_id, creditor_id):
                return None
            raise ForeignRowError(
                f"{table.name}: the shard is not responsible for account ({debtor_id}, {creditor_id})"
            )
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
