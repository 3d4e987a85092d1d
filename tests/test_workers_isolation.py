"""A failure for one account never stops the workers (issue 8, observation 4).

`pyswpt run workers` runs as a real process; one account is made to fail in
the database itself (a trigger on pyswpt.account that refuses it, or sleeps
past the statement timeout). The other accounts are processed, the failing
one is logged in one line and tried again later, the other stages go on,
and the process stays alive.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator

import psycopg
import psycopg.errors
import pytest
from drivers import Running, driver_environment, running, wait_for
from factories import T0, failing_account_writes, insert_account

from pyswpt.transactions import is_infrastructure_error

DEBTOR = 1
BAD_CREDITOR = 666
# Accounts that never fail (the list functions return accounts in no fixed order).
GOOD_CREDITORS = (1000, 1001, 1002)
SECRET = "secret row contents"
WORKER_SETTINGS = {
    "APP_PROCESS_BALANCE_CHANGES_WAIT": "0.2",
    "APP_PROCESS_TRANSFER_REQUESTS_WAIT": "0.2",
    "APP_PROCESS_FINALIZATION_REQUESTS_WAIT": "0.2",
}
# How the trigger makes the bad account fail: a refusal, or a statement that
# outlasts the workers' statement_timeout (given in POSTGRES_URL, whose
# options win over the connection factory's).
FAILURES = {
    "refusal": (
        f"RAISE EXCEPTION 'account refused by the test' USING ERRCODE = 'check_violation', DETAIL = '{SECRET}';",
        "",
        "SQLSTATE 23514: account refused by the test",
    ),
    "timeout": (
        "PERFORM pg_sleep(30);",
        "options=-c%20statement_timeout%3D1000",
        "SQLSTATE 57014: canceling statement due to statement timeout",
    ),
}


@pytest.fixture(params=FAILURES)
def failing_account(request, conn, database_url) -> Iterator[tuple[Callable[[], None], dict[str, str], str]]:
    """Processing the bad account fails until told to stop: (stop, settings, logged reason)."""
    statement, url_query, reason = FAILURES[request.param]
    settings = {"POSTGRES_URL": f"{database_url}?{url_query}"} if url_query else {}
    with failing_account_writes(conn, BAD_CREDITOR, statement) as stop_failing:
        yield stop_failing, settings, reason


def register_change(conn: psycopg.Connection, creditor_id: int, change_id: int) -> None:
    conn.execute(
        "SELECT register_balance_change(%s, 777, %s, %s, 'direct', '', %s, now(), 100, %s)",
        (DEBTOR, change_id, creditor_id, SECRET, T0),
    )


def enqueue_transfer_request(conn: psycopg.Connection, sender_creditor_id: int) -> None:
    now = dt.datetime.now(dt.UTC)
    conn.execute(
        "SELECT enqueue_transfer_request(%s, %s, 'direct', %s, 1, 0, 100, 1234, %s, 3600, %s, true, %s)",
        (DEBTOR, sender_creditor_id, sender_creditor_id, T0, now, now),
    )


def register_changes_of_every_account(conn: psycopg.Connection) -> None:
    """A change for the bad account and one for each good one."""
    register_change(conn, BAD_CREDITOR, 1)
    for change_id, creditor_id in enumerate(GOOD_CREDITORS, start=2):
        register_change(conn, creditor_id, change_id)


def count(conn: psycopg.Connection, query: str, *params: object) -> int:
    return conn.execute(query, params).fetchone()[0]


def pending_changes(conn: psycopg.Connection, creditor_ids: tuple[int, ...]) -> int:
    return count(conn, "SELECT count(*) FROM pending_balance_change WHERE creditor_id = ANY(%s)", list(creditor_ids))


def queued_requests(conn: psycopg.Connection, sender_creditor_ids: tuple[int, ...]) -> int:
    return count(
        conn, "SELECT count(*) FROM transfer_request WHERE sender_creditor_id = ANY(%s)", list(sender_creditor_ids)
    )


def skip_lines(log: str) -> list[str]:
    return re.findall(rf".*creditor_id={BAD_CREDITOR}\b.*", log)


def wait_for_the_failure(workers: Running) -> None:
    """Until the failing account is logged (or the process ended: the test fails on that)."""
    wait_for(lambda: skip_lines(workers.log()) or workers.process.poll() is not None, "the failing account")
    workers.assert_alive()


def test_an_account_that_fails_is_logged_and_retried_while_the_others_are_processed(
    conn, database_url, rabbitmq_url, tmp_path, failing_account
):
    stop_failing, settings, reason = failing_account
    register_changes_of_every_account(conn)
    # One account per round: the failing one must not crowd out the others while it waits.
    environ = driver_environment(
        database_url, rabbitmq_url, **WORKER_SETTINGS, **settings, APP_PROCESS_BALANCE_CHANGES_MAX_COUNT="1"
    )
    with running(["run", "workers"], environ, tmp_path) as workers:
        wait_for(lambda: pending_changes(conn, GOOD_CREDITORS) == 0, "the other accounts' changes")
        wait_for_the_failure(workers)
        line = skip_lines(workers.log())[0]
        skipped = f"Skipped balance_changes of account debtor_id={DEBTOR} creditor_id={BAD_CREDITOR} ({reason})"
        assert f"WARNING:pyswpt.drivers.workers:{skipped}" in line
        assert pending_changes(conn, (BAD_CREDITOR,)) == 1

        stop_failing()
        wait_for(lambda: pending_changes(conn, (BAD_CREDITOR,)) == 0, "the failing account on a later retry")
        assert count(conn, "SELECT principal FROM account WHERE creditor_id = %s", BAD_CREDITOR) == 100
        workers.assert_alive()
        log = workers.log()
    assert SECRET not in log
    assert "Traceback" not in log


def test_an_account_that_fails_in_a_call_of_several_goes_alone_and_the_calls_others_are_processed(
    conn, database_url, rabbitmq_url, tmp_path, failing_account
):
    _, settings, reason = failing_account
    register_changes_of_every_account(conn)
    # The first round lists the four accounts: one call for them, which fails at the bad one.
    environ = driver_environment(database_url, rabbitmq_url, **WORKER_SETTINGS, **settings)
    with running(["run", "workers"], environ, tmp_path) as workers:
        wait_for(lambda: pending_changes(conn, GOOD_CREDITORS) == 0, "the other accounts' changes")
        wait_for_the_failure(workers)
        log = workers.log()
    assert f"A call of balance_changes for 4 accounts failed ({reason}); processing them one at a time." in log
    assert f"Skipped balance_changes of account debtor_id={DEBTOR} creditor_id={BAD_CREDITOR} ({reason})" in log
    assert pending_changes(conn, (BAD_CREDITOR,)) == 1


def test_the_accounts_of_a_call_do_not_wait_behind_one_that_waits_for_its_lock(
    conn, database_url, rabbitmq_url, tmp_path
):
    # One call for the three, which fails when the locked one has waited for the hold-back.
    locked, others = GOOD_CREDITORS[0], GOOD_CREDITORS[1:]
    insert_account(conn, DEBTOR, locked)
    for creditor_id in GOOD_CREDITORS:
        enqueue_transfer_request(conn, creditor_id)
    environ = driver_environment(database_url, rabbitmq_url, **WORKER_SETTINGS)
    with psycopg.connect(database_url) as holder:
        holder.execute(
            "SELECT 1 FROM pyswpt.account WHERE debtor_id = %s AND creditor_id = %s FOR NO KEY UPDATE", (DEBTOR, locked)
        )
        with running(["run", "workers"], environ, tmp_path) as workers:
            # Within the test's deadline, far shorter than the workers' lock timeout.
            wait_for(lambda: queued_requests(conn, others) == 0, "the other senders' requests")
            assert queued_requests(conn, (locked,)) == 1
            holder.rollback()
            wait_for(lambda: queued_requests(conn, (locked,)) == 0, "the locked sender's request")
            workers.assert_alive()


def test_a_failing_account_in_one_stage_does_not_stop_the_others(
    conn, database_url, rabbitmq_url, tmp_path, failing_account
):
    _, settings, _ = failing_account
    register_change(conn, BAD_CREDITOR, 1)
    environ = driver_environment(database_url, rabbitmq_url, **WORKER_SETTINGS, **settings)
    with running(["run", "workers"], environ, tmp_path) as workers:
        wait_for_the_failure(workers)
        enqueue_transfer_request(conn, GOOD_CREDITORS[0])
        wait_for(lambda: count(conn, "SELECT count(*) FROM transfer_request") == 0, "the transfer request")
        assert count(conn, "SELECT count(*) FROM rejected_transfer_signal") == 1
        workers.assert_alive()


def test_workers_reconnect_after_losing_their_database_connections(conn, database_url, rabbitmq_url, tmp_path):
    environ = driver_environment(database_url, rabbitmq_url, **WORKER_SETTINGS)
    with running(["run", "workers"], environ, tmp_path) as workers:
        register_change(conn, GOOD_CREDITORS[0], 1)
        wait_for(lambda: pending_changes(conn, GOOD_CREDITORS) == 0, "the first change")
        terminated = count(
            conn,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'pyswpt balance_changes%%'",
        )
        assert terminated == 2  # the stage's listener and its one worker thread
        register_change(conn, GOOD_CREDITORS[1], 2)
        wait_for(lambda: pending_changes(conn, GOOD_CREDITORS) == 0, "the change after the loss")
        workers.assert_alive()
        assert "The balance_changes stage failed (" in workers.log()


@pytest.mark.parametrize(
    ("error", "infrastructure"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (psycopg.errors.AdminShutdown(), True),
        (psycopg.errors.CannotConnectNow(), True),
        (psycopg.errors.ConnectionFailure(), True),
        (psycopg.errors.TooManyConnections(), True),
        (psycopg.errors.DiskFull(), True),
        (psycopg.errors.ReadOnlySqlTransaction(), True),
        (psycopg.errors.InvalidSqlStatementName(), True),
        (psycopg.errors.UndefinedFunction(), True),
        (psycopg.errors.InsufficientPrivilege(), True),
        (psycopg.errors.UndefinedTable(), True),
        (psycopg.errors.QueryCanceled(), False),
        (psycopg.errors.LockNotAvailable(), False),
        (psycopg.errors.SerializationFailure(), False),
        (psycopg.errors.ProgramLimitExceeded(), False),
        (psycopg.errors.CheckViolation(), False),
        (psycopg.errors.RaiseException(), False),
        (psycopg.errors.NumericValueOutOfRange(), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_only_the_servers_failures_are_infrastructure_errors(error, infrastructure):
    assert is_infrastructure_error(error) is infrastructure
