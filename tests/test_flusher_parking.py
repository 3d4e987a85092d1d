"""The flusher sets aside a row it cannot read, encode or route, and goes on (issue 8).

Rows the broker confirmed are committed once and never published again; a
set-aside row is parked with its reason, logged in one line, and retried with
backoff when a retry can help.
"""

from __future__ import annotations

import datetime as dt
import random
import re

import psycopg
import pytest
from broker import catching_queue, declare_smp_exchanges
from drivers import driver_environment, running, wait_for

from pyswpt import amqp, config, outbox, sharding
from pyswpt.drivers import flusher

UTC = dt.UTC
NOW = dt.datetime(2024, 5, 20, 10, 15, 30, 123456, tzinfo=UTC)
DEBTOR = -2
SENDER = 1099511627778
UNBOUND_COORDINATOR_TYPE = "zzz"
# PostgreSQL stores it; Python's datetime ends at year 9999.
PAST_YEAR_9999 = "10000-01-01 00:00:00+00"
# How long the flusher must keep running without publishing a confirmed row again.
QUIET_ROUNDS = 3
FLUSH_PERIOD_SECONDS = 0.2


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


@pytest.fixture
def publisher(rabbitmq_url):
    batch_publisher = amqp.BatchPublisher(rabbitmq_url)
    yield batch_publisher
    batch_publisher.close()


def settings(database_url: str, rabbitmq_url: str) -> config.Config:
    return config.load({"POSTGRES_URL": database_url, "PROTOCOL_BROKER_URL": rabbitmq_url})


def flusher_environment(database_url: str, rabbitmq_url: str) -> dict[str, str]:
    return driver_environment(database_url, rabbitmq_url, FLUSH_PERIOD=str(FLUSH_PERIOD_SECONDS), FLUSH_PROCESSES="1")


def insert_rejected_transfer(
    conn: psycopg.Connection, coordinator_type: str, coordinator_id: int, request_id: int, inserted_at=NOW
) -> None:
    """A RejectedTransfer in the outbox, as the transfer worker writes it."""
    conn.execute(
        "INSERT INTO rejected_transfer_signal (debtor_id, sender_creditor_id, coordinator_type, coordinator_id,"
        " coordinator_request_id, status_code, total_locked_amount, inserted_at)"
        " VALUES (%s, %s, %s, %s, %s, 'RECIPIENT_IS_UNREACHABLE', 0, %s)",
        (DEBTOR, SENDER, coordinator_type, coordinator_id, request_id, inserted_at),
    )


def emit_balance_change(conn: psycopg.Connection, change_id: int, recipient: int) -> None:
    conn.execute(
        "SELECT emit_pending_balance_change(%s, %s, %s, 'direct', '', 'note', %s, 5, %s)",
        (DEBTOR, change_id, recipient, NOW, NOW),
    )


def parked_rows(conn: psycopg.Connection) -> list[dict]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        return cursor.execute("SELECT * FROM parked_message ORDER BY parked_id").fetchall()


def parked_attempts(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT max(attempts) FROM parked_message").fetchone()
    return row[0] or 0


def coordinator_binding(coordinator_type: str) -> dict[str, str]:
    return {"x-match": "all", "coordinator-type": coordinator_type}


def random_coordinator_id() -> int:
    return random.randint(1, 2**62)


def test_unroutable_row_is_parked_and_its_neighbours_arrive_exactly_once(conn, database_url, rabbitmq_url, tmp_path):
    coordinator_id = random_coordinator_id()
    insert_rejected_transfer(conn, "direct", coordinator_id, 1)
    insert_rejected_transfer(conn, UNBOUND_COORDINATOR_TYPE, coordinator_id, 2)
    insert_rejected_transfer(conn, "direct", coordinator_id, 3)
    bindings = [("to_creditors", sharding.hex_routing_key(coordinator_id))]
    with catching_queue(rabbitmq_url, bindings) as catcher:
        with running(["run", "flusher"], flusher_environment(database_url, rabbitmq_url), tmp_path) as process:
            received = catcher.collect(2)
            wait_for(lambda: parked_attempts(conn) >= QUIET_ROUNDS, "retries of the unroutable message")
            catcher.assert_empty()
            process.assert_alive()

    assert sorted(m.fields["coordinator_request_id"] for m in received) == [1, 3]
    [row] = parked_rows(conn)
    assert (row["source_kind"], row["source_name"], row["reason_code"]) == (
        "outbox",
        "rejected_transfers",
        "unroutable",
    )
    assert (row["exchange"], row["message_type"], row["debtor_id"], row["creditor_id"]) == (
        "to_coordinators",
        "RejectedTransfer",
        DEBTOR,
        SENDER,
    )
    assert row["next_retry_at"] is not None
    assert row["headers"]["coordinator-type"] == UNBOUND_COORDINATOR_TYPE
    assert b'"coordinator_request_id":2' in bytes(row["body"])
    assert conn.execute("SELECT count(*) FROM rejected_transfer_signal").fetchone()[0] == 0


def test_parked_unroutable_message_is_delivered_once_a_queue_is_bound(conn, database_url, rabbitmq_url, publisher):
    coordinator_id = random_coordinator_id()
    insert_rejected_transfer(conn, UNBOUND_COORDINATOR_TYPE, coordinator_id, 7)
    cfg = settings(database_url, rabbitmq_url)
    table = outbox.TABLES_BY_NAME["rejected_transfers"]
    with flusher.connections(database_url) as (flush_conn, barrier_conn):
        flusher.flush_tables(flush_conn, barrier_conn, publisher, [table], cfg)
        # Arrangement: the first retry is due now instead of in a second.
        conn.execute("UPDATE parked_message SET next_retry_at = now()")
        assert flusher.retry_parked_messages(flush_conn, publisher, [table]) == 0
        [postponed] = parked_rows(conn)
        assert postponed["attempts"] == 2
        assert postponed["next_retry_at"] > postponed["last_seen_at"]

        conn.execute("UPDATE parked_message SET next_retry_at = now()")
        with catching_queue(rabbitmq_url, []) as catcher:
            catcher.channel.queue_bind(
                catcher.queue, "to_coordinators", arguments=coordinator_binding(UNBOUND_COORDINATOR_TYPE)
            )
            assert flusher.retry_parked_messages(flush_conn, publisher, [table]) == 1
            [message] = catcher.collect(1)

    assert message.fields["coordinator_request_id"] == 7
    assert message.properties.headers["coordinator-type"] == UNBOUND_COORDINATOR_TYPE
    assert (message.properties.type, message.properties.delivery_mode) == ("RejectedTransfer", 2)
    assert parked_rows(conn) == []


def test_unreadable_row_is_parked_and_the_flusher_goes_on(conn, database_url, rabbitmq_url, tmp_path):
    coordinator_id = random_coordinator_id()
    recipient = 1099511627781
    insert_rejected_transfer(conn, "direct", coordinator_id, 1, inserted_at=PAST_YEAR_9999)
    insert_rejected_transfer(conn, "direct", coordinator_id, 2)
    emit_balance_change(conn, 1, recipient)
    bindings = [
        ("to_creditors", sharding.hex_routing_key(coordinator_id)),
        ("accounts_in", sharding.binary_routing_key(DEBTOR, recipient)),
    ]
    with catching_queue(rabbitmq_url, bindings) as catcher:
        with running(["run", "flusher"], flusher_environment(database_url, rabbitmq_url), tmp_path) as process:
            received = catcher.collect(2)
            wait_for(lambda: parked_rows(conn), "the unreadable row to be parked")
            process.assert_alive()
            log = process.log()

    assert sorted(m.properties.type for m in received) == ["PendingBalanceChange", "RejectedTransfer"]
    [row] = parked_rows(conn)
    assert (row["source_name"], row["reason_code"], row["next_retry_at"]) == ("rejected_transfers", "unreadable", None)
    assert row["row_data"]["inserted_at"] == PAST_YEAR_9999
    assert row["row_data"]["coordinator_request_id"] == "1"
    assert row["body"] is None
    assert "inserted_at" in row["reason"]
    [line] = [line for line in log.splitlines() if "unreadable" in line]
    assert f"debtor {DEBTOR}, creditor {SENDER}" in line
    assert "10000-01-01" not in line, "the log names the row, never its contents"


def test_unencodable_row_is_parked_with_its_columns(conn, database_url, rabbitmq_url, publisher):
    conn.execute("SELECT lock_or_create_account(%s, %s, %s)", (DEBTOR, SENDER, NOW))
    # A float that JSON cannot carry.
    conn.execute("UPDATE account_update_signal SET interest_rate = 'NaN'")
    cfg = settings(database_url, rabbitmq_url)
    with flusher.connections(database_url) as connections:
        assert flusher.flush_tables(*connections, publisher, [outbox.TABLES_BY_NAME["account_updates"]], cfg) == 1

    [row] = parked_rows(conn)
    assert (row["reason_code"], row["next_retry_at"], row["body"]) == ("unencodable", None, None)
    assert row["row_data"]["interest_rate"] == "NaN"
    assert (row["debtor_id"], row["creditor_id"]) == (DEBTOR, SENDER)


def test_flusher_retries_only_outgoing_messages_of_its_own_tables(conn):
    for source_kind, source_name in [("queue", "smp"), ("outbox", "account_updates"), ("outbox", "rejected_transfers")]:
        conn.execute(
            "SELECT park_message(%s, %s, 'to_creditors', 'key', 'AccountUpdate', 'application/json', NULL,"
            " %s, NULL, 1, 2, 'unroutable', 'returned', NULL, 1, %s, 10)",
            (source_kind, source_name, source_name.encode(), NOW),
        )
    due = conn.execute(
        "SELECT source_kind, source_name FROM take_due_parked_retries(ARRAY['account_updates', 'smp'], 10, %s)",
        (NOW + dt.timedelta(seconds=1),),
    ).fetchall()
    assert due == [("outbox", "account_updates")]


def test_every_outbox_table_names_its_rows_by_their_primary_key(conn):
    for table in outbox.TABLES:
        primary_key = conn.execute(
            "SELECT array_agg(a.attname ORDER BY k.ordinality)"
            " FROM pg_proc p"
            " JOIN pg_type t ON t.oid = p.prorettype"
            " JOIN pg_index i ON i.indrelid = t.typrelid AND i.indisprimary"
            " CROSS JOIN unnest(i.indkey) WITH ORDINALITY AS k(attnum, ordinality)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE p.proname = %s",
            (re.search(r"pyswpt_api\.(\w+)\(", table.take_query)[1],),
        ).fetchone()[0]
        assert tuple(primary_key) == table.key_columns, table.name
