"""An account's transfers are never dated before the transfer numbered before them.

A transfer's `committed_at` is the `now()` of the transaction that numbers it,
that is the moment the transaction began. Under READ COMMITTED a transaction
that began earlier, then waited for the account lock while a younger one
numbered a transfer, would number the next transfer with its older `now()`.
The drivers' connections (`pyswpt.db`) run at REPEATABLE READ (spec 02 §2.0):
the older transaction fails with a serialization failure once the lock is
free, and the drivers' retry runs it again with a fresh `now()`.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import psycopg
from factories import insert_account
from transfer_steps import DEBTOR_ID, SENDER_ID, rows, value

from pyswpt import db
from pyswpt.transactions import with_retries

WAIT_TIMEOUT_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.01
# The smallest call that locks an account and numbers a transfer at now(), as
# a consumer window's capitalize_interest or a worker's finalization does.
PAY = "SELECT pyswpt_private.make_direct_debtor_payment('payment', %s, %s, %s)"


def wait_until_waiting_for_a_lock(observer: psycopg.Connection, backend_pid: int) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if value(observer, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (backend_pid,)):
            return
        time.sleep(POLL_INTERVAL_SECONDS)
    raise AssertionError(f"backend {backend_pid} never waited for a lock")


def test_a_transfer_numbered_after_waiting_for_the_account_is_not_dated_before_the_previous_one(conn, database_url):
    insert_account(conn, DEBTOR_ID, SENDER_ID)
    began = threading.Event()
    lock_taken = threading.Event()
    attempts: list[int] = []

    def begin_early_then_pay(latecomer: psycopg.Connection) -> None:
        # The transaction begins (and fixes its now()) before the holder's does.
        latecomer.execute("SELECT now()")
        attempts.append(latecomer.info.backend_pid)
        began.set()
        assert lock_taken.wait(WAIT_TIMEOUT_SECONDS)
        latecomer.execute(PAY, (DEBTOR_ID, SENDER_ID, 20))

    with (
        db.connect(database_url) as holder,
        db.connect(database_url) as latecomer,
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor,
    ):
        paid = executor.submit(with_retries, latecomer, begin_early_then_pay)
        assert began.wait(WAIT_TIMEOUT_SECONDS)
        holder.execute(PAY, (DEBTOR_ID, SENDER_ID, 10))  # locks the account, numbers transfer 1
        lock_taken.set()
        wait_until_waiting_for_a_lock(conn, latecomer.info.backend_pid)
        holder.commit()
        paid.result(timeout=WAIT_TIMEOUT_SECONDS)

    transfers = rows(
        conn,
        "SELECT transfer_number, acquired_amount, committed_at FROM account_transfer_signal"
        " WHERE debtor_id = %s AND creditor_id = %s ORDER BY transfer_number",
        (DEBTOR_ID, SENDER_ID),
    )
    assert [(t["transfer_number"], t["acquired_amount"]) for t in transfers] == [(1, 10), (2, 20)]
    assert transfers[1]["committed_at"] >= transfers[0]["committed_at"]
    # The stale first attempt was rolled back and run again.
    assert len(attempts) == 2
