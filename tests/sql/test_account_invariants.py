"""The account table's invariants hold on every path that writes a column.

They are constraints of the columns' domains (migration 0011), not table
CHECKs: PostgreSQL 15 reads a table's CHECK expressions back from their text
and plans them again for every statement that writes the table, which the
account table is about three times per transfer; a domain's constraints are
planned once per session and checked where a value of the domain is made.
"""

from __future__ import annotations

import psycopg
import pytest
from factories import insert_account
from psycopg import sql

DEBTOR_ID = 1
CREDITOR_ID = 2

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


def refused_by(conn: psycopg.Connection, statement: sql.Composable | str, params: tuple = ()) -> str:
    """The name of the constraint that refuses `statement`."""
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        conn.execute(statement, params)
    return raised.value.diag.constraint_name


@pytest.mark.parametrize(("column", "value", "constraint"), VIOLATIONS)
def test_an_update_that_breaks_an_invariant_is_refused(conn, column, value, constraint):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)
    update = sql.SQL("UPDATE pyswpt.account SET {} = %s WHERE debtor_id = %s AND creditor_id = %s").format(
        sql.Identifier(column)
    )
    assert refused_by(conn, update, (value, DEBTOR_ID, CREDITOR_ID)) == constraint


@pytest.mark.parametrize(("column", "value", "constraint"), VIOLATIONS)
def test_an_insert_that_breaks_an_invariant_is_refused(conn, column, value, constraint):
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        insert_account(conn, DEBTOR_ID, CREDITOR_ID, **{column: value})
    assert raised.value.diag.constraint_name == constraint


def test_an_update_computed_from_the_column_is_checked(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, total_locked_amount=1)
    minus_two = "UPDATE pyswpt.account SET total_locked_amount = total_locked_amount - 2"
    assert refused_by(conn, minus_two) == "total_locked_amount_not_negative"


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
    assert refused_by(conn, assign) == "pending_transfers_count_not_negative"
    stored = conn.execute("SELECT pending_transfers_count FROM pyswpt.account").fetchone()
    assert stored == (0,)


def test_the_account_table_has_no_table_check_constraint(conn):
    checks = conn.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'pyswpt.account'::regclass AND contype = 'c'"
    ).fetchall()
    assert checks == []
