"""The procedures that run an entry point's batch for several accounts in one call
(45_work_queues.sql): each account in a transaction of its own, a lock wait cut short,
the wake-ups of the transactions before the last sent by the last."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator

import psycopg
import pytest
from factories import insert_account
from transfer_steps import (
    COMMIT_PERIOD_SECONDS,
    DEBTOR_ID,
    RECIPIENT_ID,
    SENDER_ID,
    enqueue_finalize,
    enqueue_prepare,
    held_by_another_transaction,
    notifications_so_far,
    prepared_transfers,
    register_balance_changes,
    rows,
    signals,
)

from pyswpt import queries
from pyswpt.drivers.workers import call_in_turn, key_columns
from pyswpt.transactions import SqlCall

SENDERS = [SENDER_ID, SENDER_ID + 1, SENDER_ID + 2]
# Far longer than an account's batch takes; a wait for a held lock still ends soon.
LOCK_TIMEOUT_MS = 200


@contextlib.contextmanager
def caller(database_url: str) -> Iterator[psycopg.Connection]:
    """A connection as a worker's: autocommit, so that a procedure may commit; with an
    empty search_path, so that the procedures must name every schema themselves."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        yield conn


def prepare_call(senders: list[int]) -> SqlCall:
    debtor_ids, creditor_ids = key_columns([(DEBTOR_ID, sender) for sender in senders])
    params = {
        "debtor_ids": debtor_ids,
        "sender_creditor_ids": creditor_ids,
        "commit_period_seconds": COMMIT_PERIOD_SECONDS,
        "lock_timeout_ms": LOCK_TIMEOUT_MS,
    }
    return SqlCall(queries.PROCESS_TRANSFER_REQUESTS_IN_TURN, params)


def prepare_in_turn(conn: psycopg.Connection, senders: list[int]) -> None:
    call = prepare_call(senders)
    conn.execute(call.query, call.params)


@pytest.fixture
def outbox_listener(database_url) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN pyswpt_outbox")
        yield listener


def queued_senders(conn: psycopg.Connection) -> list[int]:
    return [row["sender_creditor_id"] for row in rows(conn, "SELECT * FROM transfer_request ORDER BY 1, 2")]


@pytest.fixture
def senders(conn) -> list[int]:
    """Three senders of 1000, each with a queued request to lock 100 for one recipient."""
    now = dt.datetime.now(dt.UTC)
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    for sender in SENDERS:
        insert_account(conn, DEBTOR_ID, sender, principal=1000)
        enqueue_prepare(conn, sender=sender, min_locked=100, max_locked=100, ts=now, now=now)
    return SENDERS


def test_a_call_processes_every_account_it_names(conn, database_url, senders):
    with caller(database_url) as worker:
        prepare_in_turn(worker, senders)
    assert [transfer["sender_creditor_id"] for transfer in prepared_transfers(conn)] == senders
    assert queued_senders(conn) == []


def test_an_account_commits_before_the_next_waits_and_a_long_wait_fails_the_call(conn, database_url, senders):
    with caller(database_url) as worker, held_by_another_transaction(conn, database_url, senders[1]):
        with pytest.raises(psycopg.errors.LockNotAvailable):
            prepare_in_turn(worker, senders)
    # The first account's transaction committed before the second waited; the second
    # rolled back, and the third was never begun.
    assert [transfer["sender_creditor_id"] for transfer in prepared_transfers(conn)] == senders[:1]
    assert queued_senders(conn) == senders[1:]


def test_a_call_wakes_the_listeners_once_at_its_last_commit(conn, database_url, senders, outbox_listener):
    with caller(database_url) as worker:
        prepare_in_turn(worker, senders)
        # The first two accounts' transactions held their NOTIFYs; the third's sent them with its own.
        assert notifications_so_far(outbox_listener, database_url, "pyswpt_outbox") == ["prepared_transfer_signal"]
        # Holding was those transactions' own: the session's next one notifies at once.
        enqueue_prepare(conn, sender=senders[0], min_locked=100, max_locked=100, request_id=2)
        worker.execute(
            queries.PROCESS_TRANSFER_REQUESTS,
            {"debtor_id": DEBTOR_ID, "sender_creditor_id": senders[0], "commit_period_seconds": COMMIT_PERIOD_SECONDS},
        )
        assert notifications_so_far(outbox_listener, database_url, "pyswpt_outbox") == ["prepared_transfer_signal"]
    assert [transfer["sender_creditor_id"] for transfer in prepared_transfers(conn)] == [senders[0], *senders]


def test_after_a_failed_call_the_worker_sends_what_its_committed_transactions_held(
    conn, database_url, senders, outbox_listener
):
    with caller(database_url) as worker, held_by_another_transaction(conn, database_url, senders[2]):
        with pytest.raises(psycopg.errors.LockNotAvailable):
            call_in_turn(worker, prepare_call(senders))
        # The first two accounts' NOTIFYs, held for the third, which rolled back.
        assert notifications_so_far(outbox_listener, database_url, "pyswpt_outbox") == ["prepared_transfer_signal"]
        assert worker.execute(queries.SEND_HELD_NOTIFICATIONS).fetchone()[0] == 0
    assert [transfer["sender_creditor_id"] for transfer in prepared_transfers(conn)] == senders[:2]


def test_the_lock_timeout_is_the_calls_own(conn, database_url, senders):
    with caller(database_url) as worker:
        prepare_in_turn(worker, senders)
        # Each account's transaction set it for itself alone.
        assert worker.execute("SHOW lock_timeout").fetchone()[0] == "0"


def test_finalizations_and_balance_changes_go_in_turn_too(conn, database_url, senders):
    with caller(database_url) as worker:
        prepare_in_turn(worker, senders[:2])
        for transfer in prepared_transfers(conn):
            enqueue_finalize(conn, transfer, 60, ts=transfer["prepared_at"], now=transfer["prepared_at"])
        debtor_ids, creditor_ids = key_columns([(DEBTOR_ID, sender) for sender in senders[:2]])
        worker.execute(
            queries.PROCESS_FINALIZATION_REQUESTS_IN_TURN,
            {
                "debtor_ids": debtor_ids,
                "sender_creditor_ids": creditor_ids,
                "ignore_all": [False, False],
                # No realm: the recipient's changes go out as PendingBalanceChange rows.
                "realm_mask": None,
                "realm": None,
                "lock_timeout_ms": LOCK_TIMEOUT_MS,
            },
        )
        assert [row["committed_amount"] for row in signals(conn, "finalized_transfer_signal")] == [60, 60]
        changed = register_balance_changes(conn)
        assert changed == [(DEBTOR_ID, RECIPIENT_ID)]
        debtor_ids, creditor_ids = key_columns([*changed, (DEBTOR_ID, senders[2])])
        worker.execute(
            queries.PROCESS_BALANCE_CHANGES_IN_TURN,
            {"debtor_ids": debtor_ids, "creditor_ids": creditor_ids, "lock_timeout_ms": LOCK_TIMEOUT_MS},
        )
    principals = rows(conn, "SELECT creditor_id, principal FROM account ORDER BY creditor_id")
    assert [(row["creditor_id"], row["principal"]) for row in principals] == [
        (RECIPIENT_ID, 120),
        (senders[0], 940),
        (senders[1], 940),
        (senders[2], 1000),
    ]
