"""The group roles of sql/roles.sql: each can do its job through pyswpt_api and nothing more.

Each test connects as a login user of the tests that is a member of one group
role (conftest.role_urls), as a least-privilege deployment would.
"""

from __future__ import annotations

import psycopg
import pytest
from factories import insert_account

from pyswpt import db, queries, schema

DEBTOR_ID = -7
CREDITOR_ID = 1099511627789
READ_ACCOUNTS = "SELECT count(*) FROM pyswpt.account"
WRITE_ACCOUNTS = "UPDATE pyswpt.account SET principal = principal + 1"
CALL_HELPER = "SELECT pyswpt_private.calc_k(1.0)"


def run(url: str, statement: str, params: dict | None = None) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(statement, params).fetchall()


def refused(url: str, statement: str, params: dict | None = None) -> bool:
    try:
        run(url, statement, params)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def configure_params() -> dict:
    return {
        "debtor_id": DEBTOR_ID,
        "creditor_id": CREDITOR_ID,
        "ts": "2024-01-15T12:00:00Z",
        "seqnum": 1,
        "negligible_amount": 0.0,
        "config_flags": 0,
        "config_data": "",
        "max_delay_seconds": 1e9,
    }


@pytest.fixture
def one_account(conn) -> None:
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, config_data="x")


# --- web -----------------------------------------------------------------------------


def test_web_role_reads_the_fetch_api(role_urls, one_account):
    key = {"debtor_id": DEBTOR_ID, "creditor_id": CREDITOR_ID}
    assert run(role_urls["web"], queries.IS_REACHABLE_ACCOUNT, key) == [(True,)]
    assert run(role_urls["web"], queries.GET_ACCOUNT_CONFIG_DATA, key) == [("x",)]


@pytest.mark.parametrize(
    "statement",
    [READ_ACCOUNTS, WRITE_ACCOUNTS, CALL_HELPER, "SELECT count(*) FROM pyswpt_api.accounts"],
)
def test_web_role_can_do_nothing_else(role_urls, database_url, statement):
    assert refused(role_urls["web"], statement)


def test_web_role_cannot_configure_an_account(role_urls, database_url):
    assert refused(role_urls["web"], queries.CONFIGURE_ACCOUNT, configure_params())


# --- drivers -------------------------------------------------------------------------


def test_driver_role_configures_an_account_and_listens(role_urls, conn):
    assert run(role_urls["driver"], queries.CONFIGURE_ACCOUNT, configure_params()) == [(True,)]
    assert conn.execute("SELECT count(*) FROM pyswpt.account").fetchone()[0] == 1
    with db.listen(role_urls["driver"], "pyswpt_requests", application_name="pyswpt test") as listener:
        assert listener.execute("SELECT pg_listening_channels()").fetchall() == [("pyswpt_requests",)]


def test_driver_role_can_wait_for_migrations(role_urls, database_url):
    assert schema.pending_schema_migrations(role_urls["driver"]) == []


@pytest.mark.parametrize(
    "statement",
    [READ_ACCOUNTS, WRITE_ACCOUNTS, CALL_HELPER, "SELECT count(*) FROM pyswpt_api.accounts"],
)
def test_driver_role_touches_no_table_and_no_helper(role_urls, database_url, statement):
    assert refused(role_urls["driver"], statement)


def test_driver_role_cannot_run_the_audit(role_urls, database_url):
    assert refused(role_urls["driver"], queries.LIST_AUDIT_CHECKS)


# --- operators -----------------------------------------------------------------------


def test_operator_role_reads_every_view(role_urls, conn, one_account):
    views = [name for (name,) in conn.execute("SELECT viewname FROM pg_views WHERE schemaname = 'pyswpt_api'")]
    assert len(views) == 6
    for view in views:
        # With a row, so that the accounts view runs every helper it computes with.
        assert run(role_urls["operator"], f"SELECT * FROM pyswpt_api.{view}") is not None, view


def test_operator_role_reads_an_account_with_its_balance(role_urls, one_account):
    rows = run(
        role_urls["operator"],
        "SELECT balance, available_amount, is_deleted FROM pyswpt_api.accounts WHERE creditor_id = %(creditor_id)s",
        {"creditor_id": CREDITOR_ID},
    )
    assert len(rows) == 1


def test_operator_role_runs_the_audit(role_urls, one_account):
    checks = run(role_urls["operator"], queries.LIST_AUDIT_CHECKS)
    assert checks
    params = {"check_name": checks[0][0], "holds_every_account": True, "max_keys": 5}
    assert run(role_urls["operator"], queries.RUN_AUDIT_CHECK, params)


@pytest.mark.parametrize("statement", [READ_ACCOUNTS, WRITE_ACCOUNTS, CALL_HELPER])
def test_operator_role_touches_no_table_and_no_helper(role_urls, database_url, statement):
    assert refused(role_urls["operator"], statement)


def test_operator_role_cannot_process_transfer_requests(role_urls, database_url):
    params = {"debtor_id": DEBTOR_ID, "sender_creditor_id": CREDITOR_ID, "commit_period_seconds": 60}
    assert refused(role_urls["operator"], queries.PROCESS_TRANSFER_REQUESTS, params)


# --- every entry point has a role ----------------------------------------------------


def test_every_entry_point_and_view_is_granted_to_a_group_role(conn):
    rows = conn.execute(
        """
        SELECT p.proname FROM pg_proc AS p
        WHERE p.pronamespace = 'pyswpt_api'::regnamespace
            AND NOT EXISTS (
                SELECT 1 FROM aclexplode(p.proacl) AS a
                WHERE a.grantee::regrole::text IN ('pyswpt_driver', 'pyswpt_web', 'pyswpt_operator')
            )
        UNION ALL
        SELECT c.relname FROM pg_class AS c
        WHERE c.relnamespace = 'pyswpt_api'::regnamespace
            AND NOT has_table_privilege('pyswpt_operator', c.oid, 'SELECT')
        """
    ).fetchall()
    assert rows == []
