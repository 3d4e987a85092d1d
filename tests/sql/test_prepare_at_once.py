"""The consumer's intake serves a PrepareTransfer at once, in its own transaction, when the
sender's account is free (try_to_prepare_at_once), and queues it for the transfer_requests
stage otherwise: requests of the sender already queued, the account held by another
transaction or changed since this one began, an error on the sender's side, or the
transaction's attempts used up.

The lock is taken with NOWAIT, so an intake never waits for an account; the consumer applies
a window's PrepareTransfers after its other messages (tests/test_prepare_at_once_window.py),
so a window holding such locks waits for nothing and cannot close a cycle of waits.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from factories import DEFAULT_NOW, STATUS_DELETED, failing_account_writes, insert_account
from transfer_steps import (  # noqa: F401 - transfer_invariants_hold is a fixture
    COMMIT_PERIOD_SECONDS,
    DEBTOR_ID,
    RECIPIENT_ID,
    SENDER_ID,
    account,
    changed_after_the_snapshot,
    enqueue_prepare,
    held_by_another_transaction,
    prepared_transfers,
    process_prepares,
    rows,
    signals,
    transfer_invariants_hold,
)

pytestmark = pytest.mark.usefixtures("transfer_invariants_hold")

OTHER_SENDER_ID = SENDER_ID + 1
# try_to_prepare_at_once's c_max_attempts: below PostgreSQL's 64 cached subtransactions.
MAX_ATTEMPTS_PER_TRANSACTION = 60


@pytest.fixture
def sender(conn: psycopg.Connection) -> dict[str, Any]:
    """A sender with 1000 in principal and a reachable recipient in this shard."""
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    return insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)


def at_once(conn: psycopg.Connection, **request: Any) -> bool:
    """The consumer's intake: False when the request was answered at once, True when queued."""
    request.setdefault("min_locked", 100)
    request.setdefault("max_locked", 100)
    return enqueue_prepare(conn, at_once_commit_period_seconds=COMMIT_PERIOD_SECONDS, **request)


def queued(conn: psycopg.Connection) -> list[tuple[int, int]]:
    """(sender, coordinator_request_id) of each queued request, in arrival order."""
    found = rows(conn, "SELECT * FROM transfer_request ORDER BY transfer_request_id")
    return [(row["sender_creditor_id"], row["coordinator_request_id"]) for row in found]


def statuses(conn: psycopg.Connection) -> list[tuple[str, int]]:
    return [(row["status_code"], row["total_locked_amount"]) for row in signals(conn, "rejected_transfer_signal")]


def without_sender(row: dict[str, Any]) -> dict[str, Any]:
    """The row without what names its sender (or the row's place in its table)."""
    names = ("sender_creditor_id", "creditor_id", "coordinator_id", "signal_id")
    return {key: value for key, value in row.items() if key not in names}


def test_a_free_sender_is_prepared_at_once_as_the_stage_would_prepare_it(conn, sender):
    insert_account(conn, DEBTOR_ID, OTHER_SENDER_ID, principal=1000)
    assert enqueue_prepare(conn, sender=OTHER_SENDER_ID, min_locked=100, max_locked=100) is True
    assert process_prepares(conn, sender=OTHER_SENDER_ID) == 1

    assert at_once(conn) is False

    assert queued(conn) == []
    assert process_prepares(conn) == 0
    by_stage, by_intake = signals(conn, "prepared_transfer_signal")
    assert (by_intake["sender_creditor_id"], by_intake["locked_amount"]) == (SENDER_ID, 100)
    assert without_sender(by_intake) == without_sender(by_stage)
    assert without_sender(prepared_transfers(conn)[0]) == without_sender(prepared_transfers(conn)[1])
    locked = account(conn, SENDER_ID)
    assert (locked["total_locked_amount"], locked["pending_transfers_count"]) == (100, 1)
    assert without_sender(account(conn, OTHER_SENDER_ID)) == without_sender(locked)


def test_an_insufficient_amount_is_rejected_at_once(conn, sender):
    assert at_once(conn, request_id=1, min_locked=600, max_locked=600) is False
    assert at_once(conn, request_id=2, min_locked=600, max_locked=600) is False
    assert queued(conn) == []
    assert statuses(conn) == [("INSUFFICIENT_AVAILABLE_AMOUNT", 600)]
    assert account(conn, SENDER_ID)["total_locked_amount"] == 600


def test_a_missing_or_deleted_sender_is_rejected_at_once_as_by_the_stage(conn, sender):
    insert_account(conn, DEBTOR_ID, OTHER_SENDER_ID, principal=1000, status_flags=STATUS_DELETED)
    deleted = account(conn, OTHER_SENDER_ID)
    assert at_once(conn, sender=OTHER_SENDER_ID) is False
    assert at_once(conn, sender=OTHER_SENDER_ID + 1) is False
    assert queued(conn) == []
    assert statuses(conn) == [("SENDER_IS_UNREACHABLE", 0), ("SENDER_IS_UNREACHABLE", 0)]
    assert account(conn, OTHER_SENDER_ID) == deleted


def test_a_request_behind_queued_ones_of_its_sender_is_queued_and_keeps_its_place(conn, sender):
    assert enqueue_prepare(conn, request_id=1, min_locked=100, max_locked=100) is True
    assert at_once(conn, request_id=2) is True
    assert at_once(conn, sender=RECIPIENT_ID, recipient=SENDER_ID, min_locked=0) is False  # another sender
    assert queued(conn) == [(SENDER_ID, 1), (SENDER_ID, 2)]
    assert process_prepares(conn) == 2
    mine = [t for t in prepared_transfers(conn) if t["sender_creditor_id"] == SENDER_ID]
    assert [(t["coordinator_request_id"], t["transfer_id"] - mine[0]["transfer_id"]) for t in mine] == [(1, 0), (2, 1)]


def test_a_sender_held_by_another_transaction_is_queued_without_waiting(conn, database_url, sender):
    # held_by_another_transaction makes a statement that waits for the lock fail (57014).
    with held_by_another_transaction(conn, database_url, SENDER_ID):
        assert at_once(conn) is True
    assert queued(conn) == [(SENDER_ID, 1)]
    assert signals(conn, "prepared_transfer_signal") == []
    assert process_prepares(conn) == 1
    assert account(conn, SENDER_ID)["total_locked_amount"] == 100


def test_a_sender_changed_after_the_transaction_began_is_queued(conn, database_url, sender):
    # At REPEATABLE READ (the consumer's level) locking a row changed after the snapshot fails
    # with 40001; it must not fail the consumer's window.
    with changed_after_the_snapshot(conn, database_url, SENDER_ID):
        assert at_once(conn) is True
    assert queued(conn) == [(SENDER_ID, 1)]
    assert signals(conn, "prepared_transfer_signal") == []


def test_requests_of_one_sender_in_one_transaction_are_prepared_at_once_in_order(conn, sender):
    with conn.transaction():
        assert at_once(conn, request_id=1) is False
        assert at_once(conn, request_id=2) is False
    assert queued(conn) == []
    assert [(t["coordinator_request_id"], t["transfer_id"]) for t in prepared_transfers(conn)] == [
        (1, prepared_transfers(conn)[0]["transfer_id"]),
        (2, prepared_transfers(conn)[0]["transfer_id"] + 1),
    ]
    assert account(conn, SENDER_ID)["total_locked_amount"] == 200


def test_a_transaction_makes_at_most_60_attempts_and_queues_the_rest(conn, sender):
    # Past 64 subtransactions with an XID in one transaction every session's snapshots slow down.
    extra = 5
    with conn.transaction():
        outcomes = [
            at_once(conn, request_id=i, min_locked=1, max_locked=1)
            for i in range(1, MAX_ATTEMPTS_PER_TRANSACTION + extra + 1)
        ]
    assert outcomes == [False] * MAX_ATTEMPTS_PER_TRANSACTION + [True] * extra
    assert len(prepared_transfers(conn)) == MAX_ATTEMPTS_PER_TRANSACTION
    assert len(queued(conn)) == extra
    assert process_prepares(conn) == extra
    # The count is the transaction's: the next one starts again.
    with conn.transaction():
        assert at_once(conn, request_id=100, min_locked=1, max_locked=1) is False


def test_a_redelivered_request_gets_its_prepared_transfer_again_at_once(conn, sender):
    assert at_once(conn) is False
    assert at_once(conn, now=DEFAULT_NOW + dt.timedelta(minutes=1)) is False
    [transfer] = prepared_transfers(conn)
    first, again = signals(conn, "prepared_transfer_signal")
    assert first["transfer_id"] == again["transfer_id"] == transfer["transfer_id"]
    assert account(conn, SENDER_ID)["pending_transfers_count"] == 1


def test_an_error_on_the_senders_side_queues_the_request_for_the_stage(conn, sender):
    with failing_account_writes(conn, SENDER_ID, "RAISE EXCEPTION 'the sender cannot be written';"):
        assert at_once(conn) is True
        assert queued(conn) == [(SENDER_ID, 1)]
        assert prepared_transfers(conn) == []
        with pytest.raises(psycopg.errors.RaiseException):
            process_prepares(conn)
    assert process_prepares(conn) == 1
    assert account(conn, SENDER_ID)["total_locked_amount"] == 100


def test_without_a_commit_period_the_intake_only_queues(conn, sender):
    assert enqueue_prepare(conn, min_locked=100, max_locked=100) is True
    assert queued(conn) == [(SENDER_ID, 1)]
    assert signals(conn, "prepared_transfer_signal") == []
