"""The single-column invariants of the tables a transfer writes hold on every path that writes a column.

They are constraints of the columns' domains (migration 0011), not table
CHECKs: PostgreSQL 15 reads a table's CHECK expressions back from their text
and plans them again for every statement that writes the table, which for the
account table happens about three times per transfer; a domain's constraints
are planned once per session and checked where a value of the domain is made.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from factories import DEFAULT_NOW, insert_account
from psycopg import sql

DEBTOR_ID = 1
CREDITOR_ID = 2

# Tables written on every transfer: none keeps a single-column CHECK of its own.
TRANSFER_TABLES = ("account", "transfer_request", "prepared_transfer", "finalization_request", "pending_balance_change")

# (column, a value that breaks its invariant, the constraint that refuses it)
VIOLATIONS = [
    ("principal", -(2**63), "principal_is_contained"),
    ("interest_rate", -50.5, "interest_rate_in_range"),
    ("interest_rate", 100.5, "interest_rate_in_range"),
    ("previous_interest_rate", float("nan"), "previous_interest_rate_in_range"),
    ("last_transfer_number", -1, "last_transfer_number_not_negative"),
    ("negligible_amount", -0.5, "negligible_amount_not_negative"),
    ("debtor_info_sha256", bytes(31), "debtor_info_sha256_is_32_bytes"),
    ("total_locked_amount", -1, "total_locked_amount_not_negative"),
    ("pending_transfers_count", -1, "pending_transfers_count_not_negative"),
    ("last_transfer_id", -1, "last_transfer_id_not_negative"),
]


def refused_by(write: Callable[[], object]) -> str:
    """The name of the constraint that refuses `write`."""
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        write()
    return raised.value.diag.constraint_name


@pytest.mark.parametrize(("column", "value", "constraint"), VIOLATIONS)
def test_an_update_that_breaks_an_invariant_is_refused(conn, column, value, constraint):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)
    update = sql.SQL("UPDATE pyswpt.account SET {} = %s WHERE debtor_id = %s AND creditor_id = %s").format(
        sql.Identifier(column)
    )
    assert refused_by(lambda: conn.execute(update, (value, DEBTOR_ID, CREDITOR_ID))) == constraint


@pytest.mark.parametrize(("column", "value", "constraint"), VIOLATIONS)
def test_an_insert_that_breaks_an_invariant_is_refused(conn, column, value, constraint):
    assert refused_by(lambda: insert_account(conn, DEBTOR_ID, CREDITOR_ID, **{column: value})) == constraint


def test_an_update_computed_from_the_column_is_checked(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, total_locked_amount=1)
    minus_two = "UPDATE pyswpt.account SET total_locked_amount = total_locked_amount - 2"
    assert refused_by(lambda: conn.execute(minus_two)) == "total_locked_amount_not_negative"


def test_a_field_of_an_account_row_in_plpgsql_is_checked_when_assigned(conn):
    """The functions change an account as a row variable and store it whole (save_account)."""
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)
    assign = f"""
        DO $$
        DECLARE
            v_account pyswpt.account;
        BEGIN
            SELECT * INTO v_account FROM pyswpt.account WHERE debtor_id = {DEBTOR_ID} AND creditor_id = {CREDITOR_ID};
            v_account.pending_transfers_count := v_account.pending_transfers_count - 1;
            PERFORM pyswpt_private.save_account(v_account);
        END
        $$
    """
    assert refused_by(lambda: conn.execute(assign)) == "pending_transfers_count_not_negative"
    stored = conn.execute("SELECT pending_transfers_count FROM pyswpt.account").fetchone()
    assert stored == (0,)


# The six fields that name a prepared transfer, and its finalization request.
TRANSFER = {
    "debtor_id": DEBTOR_ID,
    "sender_creditor_id": CREDITOR_ID,
    "transfer_id": 1,
    "coordinator_type": "direct",
    "coordinator_id": CREDITOR_ID,
    "coordinator_request_id": 1,
}
# Valid rows of the queue tables, each with the one column a test spoils.
QUEUE_ROWS = {
    "prepared_transfer": {
        **TRANSFER,
        "recipient_creditor_id": 3,
        "prepared_at": DEFAULT_NOW,
        "final_interest_rate_ts": DEFAULT_NOW,
        "demurrage_rate": -50.0,
        "deadline": DEFAULT_NOW,
        "locked_amount": 10,
    },
    "finalization_request": {
        **TRANSFER,
        "committed_amount": 10,
        "transfer_note_format": "",
        "transfer_note": "",
        "ts": DEFAULT_NOW,
    },
    "pending_balance_change": {
        "debtor_id": DEBTOR_ID,
        "other_creditor_id": 3,
        "change_id": 1,
        "creditor_id": CREDITOR_ID,
        "coordinator_type": "direct",
        "transfer_note_format": "",
        "transfer_note": "",
        "committed_at": DEFAULT_NOW,
        "principal_delta": 10,
    },
}

QUEUE_VIOLATIONS = [
    ("prepared_transfer", "transfer_id", 0, "transfer_id_positive"),
    ("prepared_transfer", "demurrage_rate", -100.0, "demurrage_rate_in_range"),
    ("prepared_transfer", "demurrage_rate", 0.5, "demurrage_rate_in_range"),
    ("prepared_transfer", "locked_amount", -1, "locked_amount_not_negative"),
    ("finalization_request", "committed_amount", -1, "committed_amount_not_negative"),
    ("pending_balance_change", "principal_delta", 0, "principal_delta_not_zero"),
]


def insert_row(conn: psycopg.Connection, table: str, values: dict) -> None:
    conn.execute(
        sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier("pyswpt", table),
            sql.SQL(", ").join(map(sql.Identifier, values)),
            sql.SQL(", ").join(map(sql.Placeholder, values)),
        ),
        values,
    )


@pytest.mark.parametrize(("table", "column", "value", "constraint"), QUEUE_VIOLATIONS)
def test_a_queue_row_that_breaks_an_invariant_is_refused(conn, table, column, value, constraint):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)  # a prepared transfer's sender
    conn.execute(
        "INSERT INTO pyswpt.registered_balance_change VALUES (%s, 3, 1, %s, false)", (DEBTOR_ID, DEFAULT_NOW)
    )  # a pending balance change's registration
    row = QUEUE_ROWS[table]
    insert_row(conn, table, row)  # the row is valid as it is
    conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier("pyswpt", table)))
    assert refused_by(lambda: insert_row(conn, table, {**row, column: value})) == constraint


def test_no_table_a_transfer_writes_has_a_single_column_check(conn):
    """A table CHECK costs its planning at every statement that writes the table: a
    single-column one belongs to the column's domain instead."""
    checks = conn.execute(
        """
        SELECT conrelid::regclass::text, conname
        FROM pg_constraint
        WHERE contype = 'c' AND conrelid = ANY (%s::regclass[]) AND cardinality(conkey) = 1
        """,
        ([f"pyswpt.{table}" for table in TRANSFER_TABLES],),
    ).fetchall()
    assert checks == []
