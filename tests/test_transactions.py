"""Running statements with retries: a transaction around an action or a list of calls, or one statement alone."""

from __future__ import annotations

import psycopg
import pytest
from libpq_trace import round_trips, sent_queries, traced

from pyswpt import db
from pyswpt.transactions import SqlCall, execute_calls, execute_with_retries, transaction_begun_in_block, with_retries

# Fails with a serialization failure on its first call in the session, then
# returns how many times it was called: a sequence keeps counting across rollbacks.
FAIL_ONCE = """
CREATE TEMPORARY SEQUENCE calls;
CREATE FUNCTION pg_temp.fail_once() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_calls bigint := nextval('calls');
BEGIN
    IF v_calls = 1 THEN
        RAISE EXCEPTION 'first call' USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN v_calls;
END;
$$;
"""


@pytest.fixture
def autocommit_conn(database_url):
    with db.connect(database_url) as conn:
        conn.autocommit = True
        yield conn


def test_a_statement_alone_is_run_again_after_a_serialization_failure(autocommit_conn):
    autocommit_conn.execute(FAIL_ONCE)
    cursor = execute_with_retries(autocommit_conn, SqlCall("SELECT pg_temp.fail_once()", ()))
    assert cursor.fetchone() == (2,)


def test_a_statement_alone_is_committed_without_a_commit(autocommit_conn, conn):
    conn.execute("CREATE TABLE public.seen (value integer)")
    conn.commit()
    execute_with_retries(autocommit_conn, SqlCall("INSERT INTO public.seen VALUES (%(value)s)", {"value": 7}))
    assert autocommit_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert conn.execute("SELECT value FROM public.seen").fetchall() == [(7,)]


def test_a_statement_alone_runs_at_the_sessions_isolation_level(autocommit_conn):
    row = execute_with_retries(autocommit_conn, SqlCall("SELECT current_setting('transaction_isolation')", ()))
    assert row.fetchone() == (db.ISOLATION_LEVEL,)


def test_a_statement_alone_needs_autocommit(database_url):
    with db.connect(database_url) as conn, pytest.raises(ValueError, match="autocommit"):
        execute_with_retries(conn, SqlCall("SELECT 1", ()))


def test_an_action_is_run_again_in_a_new_transaction_after_a_serialization_failure(database_url):
    with db.connect(database_url) as conn:
        conn.execute(FAIL_ONCE)
        conn.commit()
        assert with_retries(conn, lambda c: c.execute("SELECT pg_temp.fail_once()").fetchone()) == (2,)


def test_calls_run_in_one_transaction_that_a_failing_call_rolls_back(database_url, conn):
    conn.execute("CREATE TABLE public.applied (value integer)")
    conn.commit()
    insert = SqlCall("INSERT INTO public.applied VALUES (%(value)s) RETURNING value", {"value": 1})
    with db.connect(database_url) as caller:
        assert execute_calls(caller, [insert, SqlCall("SELECT 2", ())]) == [(1,), (2,)]
        with pytest.raises(psycopg.errors.DivisionByZero):
            execute_calls(caller, [insert, SqlCall("SELECT 1 / 0", ()), insert])
        assert caller.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert execute_calls(caller, [SqlCall("SELECT count(*) FROM public.applied", ())]) == [(1,)]


@pytest.mark.parametrize("runs_before", range(1, 6))
def test_calls_that_failed_leave_no_statement_that_psycopg_believes_prepared(database_url, runs_before):
    """psycopg (3.3) prepares a query on its sixth run; when that run follows a failed call in the
    same pipeline, the server skips the Parse, yet psycopg still believed the statement prepared and
    every later run of the query on the connection failed (26000): a window with one bad message
    had the good ones after it fail alone too, and parked. Again and again on one connection, after
    a first failure with nothing prepared yet."""
    good = SqlCall("SELECT %(value)s::integer + 1", {"value": 1})
    bad = SqlCall("SELECT 1 / 0", ())
    window = [good] * runs_before + [bad] + [good] * 8
    with db.connect(database_url) as caller:
        with pytest.raises(psycopg.errors.DivisionByZero):
            execute_calls(caller, [bad, good])
        for _ in range(4):
            with pytest.raises(psycopg.errors.DivisionByZero):
                execute_calls(caller, window)
            assert execute_calls(caller, [good]) == [(2,)]
            assert execute_calls(caller, [good, good]) == [(2,), (2,)]
        assert caller.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_calls_are_run_again_after_a_serialization_failure(database_url):
    with db.connect(database_url) as caller:
        caller.execute(FAIL_ONCE)
        caller.commit()
        assert execute_calls(caller, [SqlCall("SELECT pg_temp.fail_once()", ())]) == [(2,)]


def test_calls_are_one_round_trip(database_url):
    with db.connect(database_url) as caller:
        with traced(caller) as lines:
            assert execute_calls(caller, [SqlCall("SELECT 1", ()), SqlCall("SELECT 2", ())]) == [(1,), (2,)]
        assert caller.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert not caller.autocommit  # as it was
    assert round_trips(lines) == 1


def test_a_single_call_is_sent_as_a_statement_alone(database_url, autocommit_conn):
    call = SqlCall("SELECT 1", ())
    with traced(autocommit_conn) as alone:
        execute_with_retries(autocommit_conn, call)
    with db.connect(database_url) as caller:
        with traced(caller) as lines:
            assert execute_calls(caller, [call]) == [(1,)]
        assert caller.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert not caller.autocommit  # as it was
    assert lines == alone  # in pipeline mode, a Flush message followed the Sync


def test_calls_run_in_one_transaction_at_the_sessions_isolation_level(database_url):
    calls = [SqlCall("SELECT current_setting('transaction_isolation'), pg_current_xact_id()", ())] * 2
    with db.connect(database_url) as caller:
        first, second = execute_calls(caller, calls)
    assert first == second
    assert first[0] == db.ISOLATION_LEVEL


def test_a_transaction_begun_in_its_block_sends_begin_with_its_first_statements(database_url, conn):
    conn.execute("CREATE TABLE public.begun_rows (value integer)")
    conn.commit()
    with db.connect(database_url) as caller:
        caller.autocommit = True
        with traced(caller) as lines, transaction_begun_in_block(caller):
            caller.execute("BEGIN; INSERT INTO public.begun_rows VALUES (1); INSERT INTO public.begun_rows VALUES (2)")
            assert caller.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    # BEGIN goes with the first statements; COMMIT after the block.
    assert round_trips(lines) == 2
    assert sent_queries(lines)[-1] == ["COMMIT"]
    assert conn.execute("SELECT value FROM public.begun_rows ORDER BY value").fetchall() == [(1,), (2,)]


def test_a_failing_transaction_begun_in_its_block_is_rolled_back(database_url, conn):
    conn.execute("CREATE TABLE public.rolled_back_rows (value integer)")
    conn.commit()
    with db.connect(database_url) as caller:
        caller.autocommit = True
        with pytest.raises(RuntimeError), transaction_begun_in_block(caller):
            caller.execute("BEGIN; INSERT INTO public.rolled_back_rows VALUES (1)")
            raise RuntimeError("the broker is gone")
        assert caller.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert conn.execute("SELECT count(*) FROM public.rolled_back_rows").fetchone() == (0,)


def test_a_transaction_begun_in_its_block_that_a_statement_fails_is_rolled_back(database_url):
    with db.connect(database_url) as caller:
        caller.autocommit = True
        with pytest.raises(psycopg.errors.DivisionByZero), transaction_begun_in_block(caller):
            caller.execute("BEGIN; SELECT 1 / 0")
        assert caller.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_transaction_begun_in_its_block_needs_autocommit(database_url):
    with db.connect(database_url) as caller, pytest.raises(ValueError, match="autocommit"):
        with transaction_begun_in_block(caller):
            pass
