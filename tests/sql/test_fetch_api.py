"""The fetch API's reads in SQL: reachability (spec 02 B10) and config data (§2.15)."""

from __future__ import annotations

import psycopg
import pytest
from factories import CONFIG_SCHEDULED_FOR_DELETION, STATUS_DELETED, STATUS_OVERFLOWN, insert_account

DEBTOR_ID = -2
CREDITOR_ID = 1099511627778


def is_reachable(conn: psycopg.Connection, debtor_id: int, creditor_id: int) -> bool | None:
    return conn.execute("SELECT is_reachable_account(%s, %s)", (debtor_id, creditor_id)).fetchone()[0]


def config_data(conn: psycopg.Connection, debtor_id: int, creditor_id: int) -> str | None:
    return conn.execute("SELECT get_account_config_data(%s, %s)", (debtor_id, creditor_id)).fetchone()[0]


def test_existing_account_is_reachable(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)
    assert is_reachable(conn, DEBTOR_ID, CREDITOR_ID) is True


def test_missing_account_is_unreachable(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID + 1)
    insert_account(conn, DEBTOR_ID + 1, CREDITOR_ID)
    assert is_reachable(conn, DEBTOR_ID, CREDITOR_ID) is False


def test_missing_root_account_is_reachable(conn):
    assert is_reachable(conn, DEBTOR_ID, 0) is True


def test_deleted_root_account_is_reachable(conn):
    insert_account(conn, DEBTOR_ID, 0, status_flags=STATUS_DELETED, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    assert is_reachable(conn, DEBTOR_ID, 0) is True


def test_deleted_account_is_unreachable(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, status_flags=STATUS_DELETED)
    assert is_reachable(conn, DEBTOR_ID, CREDITOR_ID) is False


def test_account_scheduled_for_deletion_is_unreachable(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    assert is_reachable(conn, DEBTOR_ID, CREDITOR_ID) is False


def test_other_flag_bits_do_not_affect_reachability(conn):
    insert_account(
        conn,
        DEBTOR_ID,
        CREDITOR_ID,
        status_flags=STATUS_OVERFLOWN,
        config_flags=~CONFIG_SCHEDULED_FOR_DELETION,
    )
    assert is_reachable(conn, DEBTOR_ID, CREDITOR_ID) is True


def test_config_data_of_existing_account(conn):
    insert_account(conn, DEBTOR_ID, 0, config_data='{"rate": 1.0}')
    assert config_data(conn, DEBTOR_ID, 0) == '{"rate": 1.0}'


def test_config_data_of_deleted_account_is_still_returned(conn):
    insert_account(conn, DEBTOR_ID, 0, config_data='{"rate": 2.0}', status_flags=STATUS_DELETED)
    assert config_data(conn, DEBTOR_ID, 0) == '{"rate": 2.0}'


def test_empty_config_data_is_not_null(conn):
    insert_account(conn, DEBTOR_ID, 0, config_data="")
    assert config_data(conn, DEBTOR_ID, 0) == ""


def test_config_data_of_missing_account_is_null(conn):
    insert_account(conn, DEBTOR_ID, 1, config_data="other")
    assert config_data(conn, DEBTOR_ID, 0) is None


@pytest.mark.parametrize(
    ("name", "arguments"),
    [("is_reachable_account", "bigint, bigint"), ("get_account_config_data", "bigint, bigint")],
)
def test_fetch_api_functions_are_stable(conn, name, arguments):
    volatility = conn.execute(
        "SELECT provolatile FROM pg_proc WHERE oid = %s::regprocedure",
        (f"pyswpt_api.{name}({arguments})",),
    ).fetchone()[0]
    assert volatility == "s"


def test_fetch_api_functions_run_in_a_read_only_transaction(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, config_data="x")
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        assert is_reachable(conn, DEBTOR_ID, CREDITOR_ID) is True
        assert config_data(conn, DEBTOR_ID, CREDITOR_ID) == "x"
