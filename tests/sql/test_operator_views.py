"""Operator views (sql/functions/95_operator_views.sql): accounts, prepared_transfers,
outbox_backlog and work_queues, over state arranged through the SQL functions.

The views measure ages from now() while the functions take their time as a
parameter, so each test reads now() in the same statement as the view and
compares with the times it passed in.
"""

from __future__ import annotations

import datetime as dt
import math

import pytest
from balance_steps import process_changes, register_change
from factories import CONFIG_SCHEDULED_FOR_DELETION, DEFAULT_NOW, insert_account
from transfer_steps import (
    COMMIT_PERIOD_SECONDS,
    DEBTOR_ID,
    MAX_INT64,
    RECIPIENT_ID,
    SENDER_ID,
    enqueue_finalize,
    enqueue_prepare,
    prepare,
    rows,
)

from pyswpt import schema

LATER = DEFAULT_NOW + dt.timedelta(hours=3)
OUTBOX_MESSAGE_TYPES = {
    "RejectedTransfer": "rejected_transfer_signal",
    "PreparedTransfer": "prepared_transfer_signal",
    "FinalizedTransfer": "finalized_transfer_signal",
    "AccountTransfer": "account_transfer_signal",
    "AccountUpdate": "account_update_signal",
    "AccountPurge": "account_purge_signal",
    "RejectedConfig": "rejected_config_signal",
    "PendingBalanceChange": "pending_balance_change_signal",
}


def account_view(conn, creditor_id, debtor_id=DEBTOR_ID):
    [found] = rows(
        conn,
        "SELECT *, now() AS view_now FROM accounts WHERE debtor_id = %s AND creditor_id = %s",
        (debtor_id, creditor_id),
    )
    return found


def by_key(found, key):
    return {row[key]: row for row in found}


@pytest.fixture
def sender(conn):
    """A sender with 1000 in principal and a reachable recipient in this shard."""
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    return insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)


def test_accounts_decode_the_deleted_overflown_and_scheduled_flags(conn):
    insert_account(conn, DEBTOR_ID, 1, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    assert conn.execute("SELECT try_to_delete_account(%s, 1, %s)", (DEBTOR_ID, DEFAULT_NOW)).fetchone()[0]
    register_change(conn, DEBTOR_ID, 2, MAX_INT64, change_id=1)
    register_change(conn, DEBTOR_ID, 2, MAX_INT64, change_id=2)
    process_changes(conn, DEBTOR_ID, 2)
    insert_account(conn, DEBTOR_ID, 3, principal=5, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    insert_account(conn, DEBTOR_ID, 4)

    flags = {
        creditor_id: (row["is_deleted"], row["is_overflown"], row["is_scheduled_for_deletion"])
        for creditor_id in (1, 2, 3, 4)
        for row in [account_view(conn, creditor_id)]
    }
    assert flags == {
        1: (True, False, True),
        2: (False, True, False),
        3: (False, False, True),
        4: (False, False, False),
    }


def test_accounts_balance_includes_accrued_interest_and_available_subtracts_the_locks(conn, sender):
    conn.execute(
        "UPDATE account SET interest_rate = 10.0, interest = 20.0 WHERE debtor_id = %s AND creditor_id = %s",
        (DEBTOR_ID, SENDER_ID),
    )
    assert prepare(conn, min_locked=300, max_locked=300, now=DEFAULT_NOW) is not None
    assert prepare(conn, min_locked=100, max_locked=100, request_id=2, now=LATER) is not None

    viewed = account_view(conn, SENDER_ID)
    assert (viewed["principal"], viewed["total_locked_amount"], viewed["pending_transfers_count"]) == (1000, 400, 2)
    # Interest at 10% since DEFAULT_NOW, at least a year before any test runs.
    assert viewed["balance"] > 1000 + 20 + 100
    assert viewed["available_amount"] == math.floor(viewed["balance"]) - 400
    assert viewed["oldest_prepared_transfer_age"] == viewed["view_now"] - DEFAULT_NOW
    assert viewed["last_transfer_age"] is None

    untouched = account_view(conn, RECIPIENT_ID)
    assert (untouched["balance"], untouched["available_amount"]) == (0, 0)
    assert untouched["oldest_prepared_transfer_age"] is None


def test_accounts_show_the_age_of_the_last_transfer_and_pending_balance_changes(conn):
    insert_account(conn, DEBTOR_ID, 5)
    register_change(conn, DEBTOR_ID, 5, 70, change_id=1, committed_at=DEFAULT_NOW)
    process_changes(conn, DEBTOR_ID, 5, now=LATER)
    register_change(conn, DEBTOR_ID, 5, 30, change_id=2, committed_at=LATER)
    register_change(conn, DEBTOR_ID, 6, 30, change_id=3, committed_at=LATER)

    viewed = account_view(conn, 5)
    assert viewed["principal"] == 70
    assert viewed["last_transfer_age"] == viewed["view_now"] - DEFAULT_NOW
    assert viewed["pending_balance_changes_count"] == 1


def test_prepared_transfers_show_age_deadline_and_time_to_deadline(conn, sender):
    prepared = prepare(conn, min_locked=250, max_locked=250, coordinator_id=77, request_id=9, now=DEFAULT_NOW)
    assert prepared is not None

    [viewed] = rows(conn, "SELECT *, now() AS view_now FROM prepared_transfers")
    deadline = DEFAULT_NOW + dt.timedelta(seconds=COMMIT_PERIOD_SECONDS)
    assert (viewed["debtor_id"], viewed["sender_creditor_id"], viewed["transfer_id"]) == (
        DEBTOR_ID,
        SENDER_ID,
        prepared["transfer_id"],
    )
    assert (viewed["coordinator_id"], viewed["coordinator_request_id"]) == (77, 9)
    assert (viewed["locked_amount"], viewed["recipient_creditor_id"]) == (250, RECIPIENT_ID)
    assert (viewed["prepared_at"], viewed["deadline"]) == (DEFAULT_NOW, deadline)
    assert viewed["age"] == viewed["view_now"] - DEFAULT_NOW
    assert viewed["time_to_deadline"] == deadline - viewed["view_now"]


def test_outbox_backlog_counts_each_message_type_with_its_oldest_row(conn, sender):
    enqueue_prepare(conn, recipient=None, min_locked=1, max_locked=1, request_id=1, now=LATER)
    enqueue_prepare(conn, recipient=None, min_locked=1, max_locked=1, request_id=2, now=DEFAULT_NOW)
    assert prepare(conn, min_locked=10, max_locked=10, request_id=3, now=LATER) is not None

    backlog = by_key(rows(conn, "SELECT *, now() AS view_now FROM outbox_backlog"), "message_type")
    assert {t: row["outbox_table"] for t, row in backlog.items()} == OUTBOX_MESSAGE_TYPES
    counts = {t: row["row_count"] for t, row in backlog.items() if row["row_count"]}
    assert counts == {"RejectedTransfer": 2, "PreparedTransfer": 1}
    rejected = backlog["RejectedTransfer"]
    assert rejected["oldest_inserted_at"] == DEFAULT_NOW
    assert rejected["oldest_age"] == rejected["view_now"] - DEFAULT_NOW
    assert backlog["PreparedTransfer"]["oldest_inserted_at"] == LATER
    assert (backlog["AccountPurge"]["oldest_inserted_at"], backlog["AccountPurge"]["oldest_age"]) == (None, None)


def test_outbox_backlog_covers_every_outbox_table(conn):
    viewed_tables = {name for (name,) in conn.execute("SELECT outbox_table FROM outbox_backlog").fetchall()}
    outbox_tables = {
        name
        for (name,) in conn.execute(
            """
            SELECT c.table_name
            FROM information_schema.columns AS c
            JOIN information_schema.tables AS t USING (table_schema, table_name)
            WHERE c.table_schema = 'pyswpt' AND c.column_name = 'inserted_at' AND t.table_type = 'BASE TABLE'
            """
        ).fetchall()
    }
    assert viewed_tables == outbox_tables


def test_work_queues_count_rows_and_accounts_per_stage(conn, sender):
    insert_account(conn, DEBTOR_ID, 6, principal=1000)
    prepared = prepare(conn, min_locked=10, max_locked=10, request_id=1)
    assert prepared is not None
    enqueue_prepare(conn, min_locked=1, max_locked=1, request_id=2, reachable=True)
    enqueue_prepare(conn, min_locked=1, max_locked=1, request_id=3, reachable=True)
    enqueue_prepare(conn, sender=6, min_locked=1, max_locked=1, request_id=4, reachable=True)
    enqueue_finalize(conn, prepared, 10, ts=LATER)
    register_change(conn, DEBTOR_ID, 7, 5, change_id=1, committed_at=LATER)
    register_change(conn, DEBTOR_ID, 7, 5, change_id=2, committed_at=DEFAULT_NOW)

    queues = by_key(rows(conn, "SELECT *, now() AS view_now FROM work_queues"), "stage")
    assert {stage: (row["row_count"], row["account_count"]) for stage, row in queues.items()} == {
        "transfer_request": (3, 2),
        "finalization_request": (1, 1),
        "pending_balance_change": (2, 1),
    }
    assert (queues["transfer_request"]["oldest_ts"], queues["transfer_request"]["oldest_age"]) == (None, None)
    assert queues["finalization_request"]["oldest_ts"] == LATER
    changes = queues["pending_balance_change"]
    assert changes["oldest_ts"] == DEFAULT_NOW
    assert changes["oldest_age"] == changes["view_now"] - DEFAULT_NOW


def test_views_survive_applying_the_functions_again(database_url, conn, sender):
    schema.apply_migrations(database_url)
    schema.apply_migrations(database_url)
    for view in ("accounts", "prepared_transfers", "outbox_backlog", "work_queues", "parked_messages"):
        conn.execute(f"SELECT * FROM {view}").fetchall()
    assert account_view(conn, SENDER_ID)["available_amount"] == 1000
