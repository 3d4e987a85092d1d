"""Prompt AccountUpdates (issue 12, point 4): `pyswpt run workers` announces a changed
account within APP_ACCOUNT_UPDATE_DELAY_SECONDS, at most once per that interval.

No scanner runs here, and the accounts scan interval keeps its default (8 h): every
AccountUpdate written to the outbox comes from the workers' prompt-updates loop.
"""

from __future__ import annotations

import datetime as dt
import itertools

import psycopg
from drivers import driver_environment, running, wait_for
from factories import ACCOUNTS_IN_ONE_ANNOUNCEMENT, T0, announce_while_accounts_change, insert_account

from pyswpt import config, db
from pyswpt.drivers import account_updates

DEBTOR = 1
CREDITOR = 1000
DELAY_SECONDS = 2.0
WORKER_SETTINGS = {"APP_PROCESS_BALANCE_CHANGES_WAIT": "0.2", "APP_ACCOUNT_UPDATE_DELAY_SECONDS": str(DELAY_SECONDS)}
change_ids = itertools.count(1)


def pay(conn: psycopg.Connection, amount: int) -> None:
    """A PendingBalanceChange of `amount` to CREDITOR, for the balance_changes stage."""
    conn.execute(
        "SELECT register_balance_change(%s, 777, %s, %s, 'direct', '', '', now(), %s, %s)",
        (DEBTOR, next(change_ids), CREDITOR, amount, T0),
    )


def announcements(conn: psycopg.Connection) -> list[tuple]:
    """(principal, inserted_at) of every AccountUpdate of the account, oldest first."""
    return conn.execute(
        "SELECT principal, inserted_at FROM account_update_signal WHERE creditor_id = %s ORDER BY signal_id",
        (CREDITOR,),
    ).fetchall()


def settled(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT NOT pending_account_update FROM account WHERE creditor_id = %s"
        " AND NOT EXISTS (SELECT FROM pending_balance_change WHERE creditor_id = %s)",
        (CREDITOR, CREDITOR),
    ).fetchone()
    return bool(row and row[0])


def test_a_changed_account_is_announced_promptly_and_a_busy_one_once_per_interval(
    conn, database_url, rabbitmq_url, tmp_path
):
    environ = driver_environment(database_url, rabbitmq_url, **WORKER_SETTINGS)
    with running(["run", "workers"], environ, tmp_path) as workers:
        pay(conn, 100)
        wait_for(lambda: settled(conn), "the first payment, announced")
        assert announcements(conn)[-1][0] == 100

        # A burst of payments: each one marks the account, the loop coalesces them.
        for _ in range(12):
            pay(conn, 10)
            wait_for(lambda: not conn.execute("SELECT FROM pending_balance_change").fetchall(), "the payment")
        wait_for(lambda: settled(conn), "the burst, announced")
        workers.assert_alive()

    sent = announcements(conn)
    assert sent[-1][0] == 220, "the last AccountUpdate carries the final principal"
    gaps = [(later - earlier).total_seconds() for (_, earlier), (_, later) in itertools.pairwise(sent)]
    # The database clock stamps both ends; allow for the clock of the worker process.
    assert len(sent) >= 3, sent
    assert min(gaps) >= DELAY_SECONDS - 0.1, gaps


def test_delay_zero_leaves_the_announcement_to_the_scanner(conn, database_url, rabbitmq_url, tmp_path):
    environ = driver_environment(database_url, rabbitmq_url, **WORKER_SETTINGS)
    environ["APP_ACCOUNT_UPDATE_DELAY_SECONDS"] = "0"
    with running(["run", "workers"], environ, tmp_path) as workers:
        pay(conn, 100)
        wait_for(lambda: not conn.execute("SELECT FROM pending_balance_change").fetchall(), "the first payment")
        pay(conn, 10)
        wait_for(lambda: not conn.execute("SELECT FROM pending_balance_change").fetchall(), "the second payment")
        workers.assert_alive()
    pending = conn.execute("SELECT pending_account_update FROM account WHERE creditor_id = %s", (CREDITOR,))
    assert pending.fetchone() == (True,)
    assert all(principal != 110 for principal, _ in announcements(conn))


def test_an_account_changed_during_a_call_is_announced_with_its_new_state(conn, database_url):
    # Without READ COMMITTED the call fails (40001) on the account changed after its
    # snapshot; under load so would every retry.
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    creditors = range(1, ACCOUNTS_IN_ONE_ANNOUNCEMENT + 1)
    for creditor_id in creditors:
        announced_at = long_ago + dt.timedelta(seconds=creditor_id)
        insert_account(conn, DEBTOR, creditor_id, last_heartbeat_ts=announced_at, pending_account_update=True)
    settings = config.load({"POSTGRES_URL": database_url, "APP_ACCOUNT_UPDATE_DELAY_SECONDS": "1"})
    with db.connect(database_url) as announcer:

        def call() -> int:
            with announcer.transaction():
                return account_updates.send_due_account_updates(announcer, settings)

        change = f"UPDATE account SET principal = 700 WHERE debtor_id = {DEBTOR} AND creditor_id = {creditors[-1]}"
        announced = announce_while_accounts_change(conn, database_url, announcer.info.backend_pid, call, change)
    assert announced == len(creditors)
    rows = conn.execute("SELECT creditor_id, principal FROM account_update_signal ORDER BY creditor_id").fetchall()
    assert rows == [(creditor_id, 0) for creditor_id in creditors[:-1]] + [(creditors[-1], 700)]
