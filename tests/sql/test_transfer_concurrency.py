"""Two-phase transfers under concurrency, on the drivers' own connections (`pyswpt.db`,
REPEATABLE READ; spec 02 §2.0, §4.8, §5 hazards): a processor skips requests another
transaction holds, waits for the account lock otherwise, and a serialization
failure it gets after waiting is retriable — nothing is lost or applied twice,
and no deadlock occurs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from factories import DEFAULT_NOW, insert_account
from transfer_steps import (
    COMMIT_PERIOD_SECONDS,
    DEBTOR_ID,
    RECIPIENT_ID,
    SENDER_ID,
    WHOLE_REALM,
    account,
    assert_lock_invariants,
    assert_transfer_numbers_have_no_gaps,
    enqueue_finalize,
    enqueue_prepare,
    prepared_transfers,
    process_finalizations,
    process_prepares,
    rows,
    signals,
)

from pyswpt import db, schema

T = TypeVar("T")

# Spec 02 §2.0: an operation is retried up to 8 times on 40001 / 40P01.
MAX_RETRIES = 8
WAIT_TIMEOUT_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.01
# A worker's realm that holds every account: its finalizations may credit a recipient at once.
# A processor that must not wait for any lock fails fast instead.
NO_WAIT_LOCK_TIMEOUT = "500ms"


@contextlib.contextmanager
def driver_connection(database_url: str) -> Iterator[psycopg.Connection]:
    """A driver's connection (autocommit off, REPEATABLE READ), with pyswpt on the search path."""
    with db.connect(database_url) as conn:
        conn.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
        conn.commit()
        yield conn


def call(conn: psycopg.Connection, query: str, params: tuple) -> Any:
    return conn.execute(query, params).fetchone()[0]


def process_prepares_sql(conn: psycopg.Connection) -> int:
    return call(
        conn,
        "SELECT process_transfer_requests(%s, %s, %s, %s)",
        (DEBTOR_ID, SENDER_ID, COMMIT_PERIOD_SECONDS, DEFAULT_NOW),
    )


def process_finalizations_sql(conn: psycopg.Connection) -> int:
    return call(
        conn,
        "SELECT process_finalization_requests(%s, %s, false, %s)",
        (DEBTOR_ID, SENDER_ID, DEFAULT_NOW),
    )


def with_retries(conn: psycopg.Connection, operation: Callable[[psycopg.Connection], T]) -> tuple[T, list[str]]:
    """One transaction, re-run on serialization failure or deadlock as the drivers do.

    Returns the result and the SQLSTATEs of the failed attempts.
    """
    failures: list[str] = []
    for _ in range(MAX_RETRIES + 1):
        try:
            result = operation(conn)
            conn.commit()
            return result, failures
        except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as error:
            conn.rollback()
            failures.append(error.sqlstate)
    raise AssertionError(f"still failing after {MAX_RETRIES} retries: {failures}")


def wait_until_waiting_for_a_lock(
    observer: psycopg.Connection, backend_pid: int, unless_done: concurrent.futures.Future | None = None
) -> None:
    """Poll (with a deadline) until the backend waits on a heavyweight lock, or `unless_done` is done."""
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if unless_done is not None and unless_done.done():
            return
        wait_event_type = call(
            observer,
            "SELECT coalesce(wait_event_type, '') FROM pg_stat_activity WHERE pid = %s",
            (backend_pid,),
        )
        if wait_event_type == "Lock":
            return
        time.sleep(POLL_INTERVAL_SECONDS)
    raise AssertionError(f"backend {backend_pid} never waited for a lock")


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


@pytest.fixture
def sender(conn):
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    return insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)


def test_second_transfer_processor_skips_requests_the_first_holds(conn, database_url, sender):
    enqueue_prepare(conn, max_locked=100, request_id=1)
    enqueue_prepare(conn, max_locked=100, request_id=2)
    with driver_connection(database_url) as first, driver_connection(database_url) as second:
        assert process_prepares_sql(first) == 2
        second.execute(f"SET lock_timeout = '{NO_WAIT_LOCK_TIMEOUT}'")
        assert process_prepares_sql(second) == 0  # skipped, and did not wait for the account
        second.commit()
        first.commit()
    assert len(prepared_transfers(conn)) == 2
    assert account(conn, SENDER_ID)["total_locked_amount"] == 200
    assert_lock_invariants(conn)


def test_transfer_processor_waiting_for_the_account_gets_a_retriable_serialization_failure(
    conn, database_url, sender, executor
):
    enqueue_prepare(conn, max_locked=100, request_id=1)
    with driver_connection(database_url) as first, driver_connection(database_url) as second:
        assert process_prepares_sql(first) == 1  # holds the account, changed it
        enqueue_prepare(conn, max_locked=100, request_id=2)  # arrives meanwhile
        waiting = executor.submit(with_retries, second, process_prepares_sql)
        wait_until_waiting_for_a_lock(conn, second.info.backend_pid)
        first.commit()
        handled, failures = waiting.result(timeout=WAIT_TIMEOUT_SECONDS)
    # The snapshot taken before the first commit is stale: 40001, then the retry succeeds.
    assert failures == ["40001"]
    assert handled == 1
    transfer_ids = [row["transfer_id"] for row in prepared_transfers(conn)]
    assert transfer_ids == [sender["last_transfer_id"] + 1, sender["last_transfer_id"] + 2]
    assert account(conn, SENDER_ID)["total_locked_amount"] == 200
    assert signals(conn, "rejected_transfer_signal") == []
    assert_lock_invariants(conn)


def test_transfer_processor_waits_for_a_lock_holder_that_changes_nothing(conn, database_url, sender, executor):
    enqueue_prepare(conn, max_locked=100)
    with driver_connection(database_url) as holder, driver_connection(database_url) as processor:
        holder.execute("SELECT lock_existing_account(%s, %s)", (DEBTOR_ID, SENDER_ID))
        waiting = executor.submit(with_retries, processor, process_prepares_sql)
        wait_until_waiting_for_a_lock(conn, processor.info.backend_pid)
        holder.rollback()
        handled, failures = waiting.result(timeout=WAIT_TIMEOUT_SECONDS)
    assert (handled, failures) == (1, [])
    assert len(prepared_transfers(conn)) == 1


def test_finalization_processors_never_apply_a_commit_twice(conn, database_url, sender, executor):
    for request_id in (1, 2):
        enqueue_prepare(conn, min_locked=100, max_locked=100, request_id=request_id)
    with driver_connection(database_url) as setup:
        with_retries(setup, process_prepares_sql)
    first_transfer, second_transfer = signals(conn, "prepared_transfer_signal")
    enqueue_finalize(conn, first_transfer, 40)
    with driver_connection(database_url) as first, driver_connection(database_url) as second:
        assert process_finalizations_sql(first) == 1
        second.execute(f"SET lock_timeout = '{NO_WAIT_LOCK_TIMEOUT}'")
        assert process_finalizations_sql(second) == 0  # the request is taken: skipped
        second.commit()
        second.execute("RESET lock_timeout")
        second.commit()
        enqueue_finalize(conn, second_transfer, 60)
        waiting = executor.submit(with_retries, second, process_finalizations_sql)
        wait_until_waiting_for_a_lock(conn, second.info.backend_pid)
        first.commit()
        handled, failures = waiting.result(timeout=WAIT_TIMEOUT_SECONDS)
    assert (handled, failures) == (1, ["40001"])
    finalized = signals(conn, "finalized_transfer_signal")
    assert [(row["status_code"], row["committed_amount"]) for row in finalized] == [("OK", 40), ("OK", 60)]
    assert [row["principal_delta"] for row in signals(conn, "pending_balance_change_signal")] == [40, 60]
    sender_after = account(conn, SENDER_ID)
    assert (sender_after["principal"], sender_after["last_change_seqnum"]) == (900, sender["last_change_seqnum"] + 2)
    assert_lock_invariants(conn)
    assert_transfer_numbers_have_no_gaps(conn)


THREADS = 4
TRANSFERS_PER_THREAD = 15
LOCKED = 10
COMMITTED = 7


def pay_repeatedly(database_url: str, thread: int) -> list[str]:
    """One client: prepare, wait for its transfer, commit part of it; returns the retried SQLSTATEs."""
    failures: list[str] = []
    with driver_connection(database_url) as conn:
        for number in range(TRANSFERS_PER_THREAD):
            request_id = thread * 1000 + number
            _, retried = with_retries(
                conn,
                lambda c, request_id=request_id: enqueue_prepare(
                    c, min_locked=LOCKED, max_locked=LOCKED, request_id=request_id
                ),
            )
            failures += retried
            failures += with_retries(conn, process_prepares_sql)[1]
            transfer = wait_for_prepared_transfer(conn, request_id)
            failures += with_retries(conn, lambda c, transfer=transfer: enqueue_finalize(c, transfer, COMMITTED))[1]
            failures += with_retries(conn, process_finalizations_sql)[1]
    return failures


def wait_for_prepared_transfer(conn: psycopg.Connection, request_id: int) -> dict[str, Any]:
    """Another client's processor may have served our request: poll until it committed."""
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        found = rows(conn, "SELECT * FROM prepared_transfer_signal WHERE coordinator_request_id = %s", (request_id,))
        conn.commit()
        if found:
            return found[0]
        time.sleep(POLL_INTERVAL_SECONDS)
    raise AssertionError(f"request {request_id} was never prepared")


def test_many_clients_of_one_sender_lose_nothing_and_never_deadlock(conn, database_url, sender, executor):
    conn.execute("UPDATE account SET principal = 1000000 WHERE creditor_id = %s", (SENDER_ID,))
    futures = [executor.submit(pay_repeatedly, database_url, thread) for thread in range(THREADS)]
    failures = [code for future in futures for code in future.result(timeout=120)]
    # Drain whatever a client's last call left for another one.
    with driver_connection(database_url) as drain:
        with_retries(drain, process_prepares_sql)
        with_retries(drain, process_finalizations_sql)

    total = THREADS * TRANSFERS_PER_THREAD
    assert set(failures) <= {"40001"}  # never a deadlock (40P01)
    finalized = signals(conn, "finalized_transfer_signal")
    assert len(finalized) == total
    assert {row["status_code"] for row in finalized} == {"OK"}
    assert sum(row["principal_delta"] for row in signals(conn, "pending_balance_change_signal")) == total * COMMITTED
    sender_after = account(conn, SENDER_ID)
    assert sender_after["principal"] == 1000000 - total * COMMITTED
    assert (sender_after["total_locked_amount"], sender_after["pending_transfers_count"]) == (0, 0)
    assert sender_after["last_transfer_id"] == sender["last_transfer_id"] + total
    assert len(signals(conn, "account_transfer_signal")) == total
    assert_transfer_numbers_have_no_gaps(conn)
    assert rows(conn, "SELECT * FROM transfer_request") == []
    assert rows(conn, "SELECT * FROM finalization_request") == []
    assert prepared_transfers(conn) == []


def test_two_accounts_paying_each_other_at_once_never_wait_for_each_other(conn, database_url, executor):
    # Each finalization holds its sender and tries the other account, which the other
    # one holds. Were the second lock to wait, they would deadlock (40P01); it does not:
    # both queue their change and finish. A deadlock inside the attempt would be caught
    # and the change queued all the same, but with a warning: there must be none.
    for creditor_id in (SENDER_ID, RECIPIENT_ID):
        insert_account(conn, DEBTOR_ID, creditor_id, principal=1000)
    enqueue_prepare(conn, min_locked=100, max_locked=100, sender=SENDER_ID, recipient=RECIPIENT_ID, reachable=True)
    enqueue_prepare(conn, min_locked=100, max_locked=100, sender=RECIPIENT_ID, recipient=SENDER_ID, reachable=True)
    process_prepares(conn, sender=SENDER_ID)
    process_prepares(conn, sender=RECIPIENT_ID)
    for transfer in signals(conn, "prepared_transfer_signal"):
        enqueue_finalize(conn, transfer, 40)
    warnings: list[str] = []
    with driver_connection(database_url) as one_way, driver_connection(database_url) as other_way:
        for session in (one_way, other_way):
            session.add_notice_handler(lambda notice: warnings.append(notice.message_primary))
        one_way.execute("SELECT lock_existing_account(%s, %s)", (DEBTOR_ID, SENDER_ID))
        # Holds RECIPIENT_ID (its sender) when done, and tries SENDER_ID, which one_way holds.
        other = executor.submit(process_finalizations, other_way, sender=RECIPIENT_ID, realm=WHOLE_REALM)
        wait_until_waiting_for_a_lock(conn, other_way.info.backend_pid, unless_done=other)
        # Tries RECIPIENT_ID, which other_way holds.
        assert process_finalizations(one_way, sender=SENDER_ID, realm=WHOLE_REALM) == 1
        assert other.result(timeout=WAIT_TIMEOUT_SECONDS) == 1
        one_way.commit()
        other_way.commit()
    assert warnings == []
    assert sorted(row["creditor_id"] for row in rows(conn, "SELECT creditor_id FROM pending_balance_change")) == [
        RECIPIENT_ID,
        SENDER_ID,
    ]
