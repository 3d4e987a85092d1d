"""select_debtor_settings_chores: rate chores from the root config (spec 02 §4.4 step 6, §2.7)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
from factories import DEFAULT_NOW, insert_account
from psycopg.rows import dict_row

DEBTOR_ID = -2
CREDITOR_ID = 1099511627778
NOW = DEFAULT_NOW
MESSAGE_MAX_DELAY_DAYS = 7.0


def arrange(conn: psycopg.Connection, root_config_data: str, *, stored_rate: float) -> None:
    """A root account with this config, and an account whose last rate change is long past."""
    insert_account(conn, DEBTOR_ID, 0, config_data=root_config_data)
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=NOW - dt.timedelta(days=30), interest_rate=stored_rate)


def scan(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """The chores for the non-root account, with the root config read locally as the scanner does."""
    root_config_data = conn.execute(
        "SELECT config_data FROM account WHERE debtor_id = %s AND creditor_id = 0", (DEBTOR_ID,)
    ).fetchone()[0]
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT debtor_id, creditor_id, interest_rate FROM select_debtor_settings_chores(%s, %s, %s, %s, %s, %s)",
            ([DEBTOR_ID], [CREDITOR_ID], [DEBTOR_ID], [root_config_data], MESSAGE_MAX_DELAY_DAYS, NOW),
        ).fetchall()


def test_rate_that_differs_from_the_stored_one_gets_a_chore(conn):
    arrange(conn, '{"rate": 2.5}', stored_rate=0.0)
    assert scan(conn) == [{"debtor_id": DEBTOR_ID, "creditor_id": CREDITOR_ID, "interest_rate": 2.5}]


def test_rate_equal_to_the_stored_one_in_single_precision_gets_no_chore(conn):
    arrange(conn, '{"rate": 3.567}', stored_rate=3.567)
    assert scan(conn) == []


# Issue 8, observation 5: the comparison cast 1e-46 to `real`, raised 22003
# (underflow) on every pass, and the accounts scanner died at this debtor.
# parse_root_config now gives 0.0 for it (test_root_config.py), and the
# comparison itself cannot fail: either one alone keeps this test passing.
def test_root_config_with_a_rate_too_small_for_single_precision_does_not_stop_the_scan(conn):
    arrange(conn, '{"rate": 1e-46}', stored_rate=5.0)
    assert [row["creditor_id"] for row in scan(conn)] == [CREDITOR_ID]


# change_interest_rate stores a rate this small as zero: a chore would change
# nothing and be sent again on every pass.
def test_rate_that_change_interest_rate_stores_as_zero_gets_no_chore_for_a_zero_rate(conn):
    arrange(conn, '{"rate": 1e-41}', stored_rate=0.0)
    assert scan(conn) == []
