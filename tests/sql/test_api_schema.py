"""The API schema: pyswpt_api holds exactly what callers may use, pyswpt_private the helpers,
pyswpt only tables and trigger functions; a caller granted one entry point gets nothing else."""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest

from pyswpt import queries, schema

# What operators call besides the statements of pyswpt.queries (README: audit, views).
OPERATOR_FUNCTIONS = {"debtor_balances", "audit_ledger"}
OPERATOR_VIEWS = {"accounts", "prepared_transfers", "outbox_backlog", "work_queues", "parked_messages", "scan_passes"}
ENTRY_POINT_SEARCH_PATH = "search_path=pyswpt, pyswpt_private, pg_temp"
# Functions that run in their caller's search_path and name nothing but pg_catalog's
# objects, qualified: no search_path can change what they call (proven for each below).
RUN_IN_ANY_SEARCH_PATH = {"pyswpt.notify_table_filled"}
# A NOLOGIN role of the tests, shared by every test session on the server (roles
# are cluster-wide): created when missing, never dropped. Its grants live in the
# session's database and go with it.
TEST_CALLER_ROLE = "pyswpt_test_caller"


def functions_named_by_queries() -> set[str]:
    statements = (value for name, value in vars(queries).items() if name.isupper() and isinstance(value, str))
    return {name for statement in statements for name in re.findall(r"pyswpt_api\.(\w+)\s*\(", statement)}


def function_names(conn: psycopg.Connection, schema: str) -> set[str]:
    rows = conn.execute("SELECT proname FROM pg_proc WHERE pronamespace = %s::regnamespace", (schema,))
    return {name for (name,) in rows}


def test_the_api_schema_holds_exactly_the_called_functions(conn):
    assert function_names(conn, "pyswpt_api") == functions_named_by_queries() | OPERATOR_FUNCTIONS


def test_the_api_schema_holds_exactly_the_operator_views(conn):
    rows = conn.execute(
        "SELECT relname, relkind::text FROM pg_class WHERE relnamespace = 'pyswpt_api'::regnamespace"
    ).fetchall()
    # A view has a row type of the same name, which pg_class does not list.
    assert set(rows) == {(name, "v") for name in OPERATOR_VIEWS}


def test_every_entry_point_is_security_definer_with_a_pinned_search_path(conn):
    rows = conn.execute(
        """
        SELECT proname, prosecdef, proconfig FROM pg_proc
        WHERE pronamespace = 'pyswpt_api'::regnamespace AND prokind <> 'p'
        """
    ).fetchall()
    assert rows
    # The per-account entry points also force their indexes, the outbox takes their TID
    # scan, which must not be compiled (tests/sql/test_plans.py).
    allowed = (
        [ENTRY_POINT_SEARCH_PATH],
        [ENTRY_POINT_SEARCH_PATH, "enable_seqscan=off"],
        [ENTRY_POINT_SEARCH_PATH, "enable_seqscan=off", "jit=off"],
    )
    assert [row for row in rows if not row[1] or row[2] not in allowed] == []


def test_the_only_procedures_run_entry_points_in_turn_with_their_callers_rights(conn):
    # PostgreSQL lets a procedure COMMIT only without SECURITY DEFINER and SET clauses: so
    # these have neither, and call nothing but entry points (45_work_queues.sql).
    rows = conn.execute(
        """
        SELECT pronamespace::regnamespace::text, proname, prosecdef, proconfig FROM pg_proc
        WHERE prokind = 'p' AND pronamespace::regnamespace::text LIKE 'pyswpt%'
        """
    ).fetchall()
    assert sorted(rows) == [
        ("pyswpt_api", f"process_{stage}_in_turn", False, None)
        for stage in ("balance_changes", "finalization_requests", "transfer_requests")
    ]


def test_no_helper_runs_with_its_owners_rights_but_the_one_of_the_accounts_view(conn):
    rows = conn.execute(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'pyswpt_private'::regnamespace AND prosecdef"
    ).fetchall()
    assert rows == [("calc_account_figures",)]


def test_what_runs_in_a_callers_search_path_pins_its_own_or_binds_its_names(conn):
    # A PL/pgSQL helper does not pin its search_path (a SET clause costs a GUC
    # save, restore and search-path lookup per call): it runs in its caller's.
    # That is safe while every caller pins one. The callers that do not are
    # views, constraints, defaults, indexes and triggers, which run in the
    # session's search_path: whatever they call, directly or through SQL-standard
    # bodies (the only bodies whose calls pg_depend records), must pin its own
    # search_path, bind its names at creation with a SQL-standard body, or name
    # only pg_catalog's objects (RUN_IN_ANY_SEARCH_PATH).
    rows = conn.execute(
        """
        WITH RECURSIVE
        named_by_schema_objects AS (
            SELECT d.refobjid AS function_oid
            FROM pg_depend AS d
            WHERE d.refclassid = 'pg_proc'::regclass
                AND d.classid IN (
                    'pg_rewrite'::regclass,
                    'pg_constraint'::regclass,
                    'pg_attrdef'::regclass,
                    'pg_class'::regclass,
                    'pg_trigger'::regclass
                )
        ),
        reached AS (
            SELECT function_oid FROM named_by_schema_objects
            UNION
            SELECT d.refobjid
            FROM reached AS r
            JOIN pg_depend AS d
                ON d.classid = 'pg_proc'::regclass AND d.objid = r.function_oid AND d.refclassid = 'pg_proc'::regclass
        )
        SELECT format('%s.%s', p.pronamespace::regnamespace, p.proname)
        FROM reached AS r
        JOIN pg_proc AS p ON p.oid = r.function_oid
        WHERE p.pronamespace IN ('pyswpt'::regnamespace, 'pyswpt_api'::regnamespace, 'pyswpt_private'::regnamespace)
            AND p.prosqlbody IS NULL
            AND NOT EXISTS (SELECT FROM unnest(p.proconfig) AS setting WHERE setting LIKE 'search_path=%')
        """
    ).fetchall()
    assert {name for (name,) in rows} - RUN_IN_ANY_SEARCH_PATH == set()


# What the wake-up trigger calls, each shadowed by a function that fails if it is called instead.
SHADOWED_BY_THE_TEST = (
    "pg_notify(text, text)",
    "texteq(text, text)",
    "current_setting(text, boolean)",
    "set_config(text, text, boolean)",
)


@pytest.fixture
def shadowing_search_path(conn) -> Iterator[None]:
    """The session's search_path puts a schema first whose functions bear the names of those
    the trigger calls: the statement trigger fires in whatever search_path the inserting
    session has, and that must not change what it calls."""
    conn.execute("CREATE SCHEMA shadowing")
    try:
        for signature in SHADOWED_BY_THE_TEST:
            conn.execute(
                f"""
                CREATE FUNCTION shadowing.{signature} RETURNS text LANGUAGE plpgsql
                AS $$ BEGIN RAISE EXCEPTION 'the shadowing function was called'; END; $$
                """
            )
        conn.execute("SET search_path = shadowing, pg_catalog, pyswpt")
        conn.execute("LISTEN pyswpt_outbox")
        yield
    finally:
        conn.execute("UNLISTEN *")
        conn.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
        conn.execute("DROP SCHEMA shadowing CASCADE")


def insert_rejected_config_signal(conn: psycopg.Connection) -> None:
    conn.execute(
        """
        INSERT INTO rejected_config_signal (
            debtor_id, creditor_id, config_ts, config_seqnum, config_flags, config_data,
            negligible_amount, rejection_code, inserted_at
        )
        VALUES (1, 2, now(), 0, 0, '', 0.0, 'INVALID_CONFIGURATION', now())
        """
    )


def test_the_wake_up_trigger_notifies_in_a_search_path_that_shadows_what_it_calls(conn, shadowing_search_path):
    insert_rejected_config_signal(conn)
    notices = list(conn.notifies(timeout=10.0, stop_after=1))
    assert [(notice.channel, notice.payload) for notice in notices] == [("pyswpt_outbox", "rejected_config_signal")]


def test_the_wake_up_trigger_holds_its_notify_in_a_search_path_that_shadows_what_it_calls(conn, shadowing_search_path):
    with conn.transaction():
        conn.execute("SELECT pg_catalog.set_config('pyswpt.hold_notifications', 'true', true)")
        insert_rejected_config_signal(conn)
    held = conn.execute("SELECT pg_catalog.current_setting('pyswpt.held_notifications')").fetchone()[0]
    assert held == "pyswpt_outbox rejected_config_signal,"
    assert list(conn.notifies(timeout=0.0)) == []


def test_the_trigger_function_and_the_accounts_view_helper_are_reached(conn):
    # The test above walks from what schema objects name; it must find these.
    rows = conn.execute(
        """
        SELECT DISTINCT p.pronamespace::regnamespace::text || '.' || p.proname
        FROM pg_depend AS d
        JOIN pg_proc AS p ON p.oid = d.refobjid
        WHERE d.refclassid = 'pg_proc'::regclass AND d.classid IN ('pg_rewrite'::regclass, 'pg_trigger'::regclass)
        """
    ).fetchall()
    assert {"pyswpt_private.calc_account_figures", "pyswpt.notify_table_filled"} <= {name for (name,) in rows}


def test_only_trigger_functions_are_left_in_the_data_schema(conn):
    rows = conn.execute(
        """
        SELECT proname FROM pg_proc
        WHERE pronamespace = 'pyswpt'::regnamespace AND prorettype <> 'trigger'::regtype
        """
    ).fetchall()
    assert rows == []
    assert conn.execute("SELECT count(*) FROM pg_views WHERE schemaname = 'pyswpt'").fetchone()[0] == 0


def test_public_may_execute_no_function_of_the_api_or_private_schema(conn):
    # A NULL proacl means the default, which lets PUBLIC (grantee 0) execute.
    rows = conn.execute(
        """
        SELECT p.oid::regprocedure::text
        FROM pg_proc AS p
        WHERE p.pronamespace IN ('pyswpt_api'::regnamespace, 'pyswpt_private'::regnamespace)
            AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) AS a WHERE a.grantee = 0))
        """
    ).fetchall()
    assert rows == []


def test_only_the_owner_may_use_the_private_schema(conn):
    rows = conn.execute(
        """
        SELECT a.grantee::regrole::text
        FROM pg_namespace AS n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) AS a
        WHERE n.nspname = 'pyswpt_private' AND a.grantee <> n.nspowner
        """
    ).fetchall()
    assert rows == []


def ensure_role(conn: psycopg.Connection, role: str) -> None:
    """Create a NOLOGIN role unless it exists; another session may be creating it at the same time."""
    conn.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE {role} NOLOGIN;
            END IF;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;
        END;
        $$
        """
    )


@pytest.fixture
def caller_of_one_entry_point(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """`conn` acting as a role that may use pyswpt_api and execute is_reachable_account, nothing more."""
    ensure_role(conn, TEST_CALLER_ROLE)
    grants = [
        f"USAGE ON SCHEMA pyswpt_api TO {TEST_CALLER_ROLE}",
        f"EXECUTE ON FUNCTION pyswpt_api.is_reachable_account(bigint, bigint) TO {TEST_CALLER_ROLE}",
    ]
    for grant in grants:
        conn.execute(f"GRANT {grant}")
    conn.execute(f"SET ROLE {TEST_CALLER_ROLE}")
    try:
        yield conn
    finally:
        conn.execute("RESET ROLE")
        for grant in grants:
            conn.execute(f"REVOKE {grant.replace(' TO ', ' FROM ')}")


def test_a_role_granted_one_entry_point_can_call_it(caller_of_one_entry_point):
    reachable = caller_of_one_entry_point.execute(
        "SELECT pyswpt_api.is_reachable_account(p_debtor_id => 1, p_creditor_id => 2)"
    ).fetchone()[0]
    assert reachable is False


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT pyswpt_api.get_account_config_data(p_debtor_id => 1, p_creditor_id => 2)",
        "SELECT pyswpt_private.calc_k(1.0)",
        "SELECT pyswpt_private.account_is_deleted(1)",
        "SELECT count(*) FROM pyswpt.account",
        "SELECT count(*) FROM pyswpt_api.accounts",
    ],
)
def test_a_role_granted_one_entry_point_can_do_nothing_else(caller_of_one_entry_point, statement):
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        caller_of_one_entry_point.execute(statement)
