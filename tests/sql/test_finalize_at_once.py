"""The end of a consumer's window serves the FinalizeTransfers it queued before it commits
(finalize_at_once), for each sender whose account is free, as the finalization stage would;
requests of a sender held by another transaction, changed since the window began, or failing
on the sender's side stay queued for the stage, and so do requests another transaction holds.

Each lock is taken with NOWAIT and nothing after it waits for a row, and the consumer calls
this after the window's intakes (tests/test_window_at_once.py), so the window cannot close a
cycle of waits.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from factories import DEFAULT_NOW, failing_account_writes, insert_account
from transfer_steps import (  # noqa: F401 - recipient and transfer_invariants_hold are fixtures
    COMMIT_PERIOD_SECONDS,
    DEBTOR_ID,
    NO_WAIT_STATEMENT_TIMEOUT,
    RECIPIENT_ID,
    SENDER_ID,
    WHOLE_REALM,
    account,
    changed_after_the_snapshot,
    enqueue_finalize,
    enqueue_prepare,
    held_by_another_transaction,
    notifications_so_far,
    prepare,
    process_finalizations,
    recipient,
    rows,
    signals,
    transfer_invariants_hold,
)

pytestmark = pytest.mark.usefixtures("transfer_invariants_hold")

LATER = DEFAULT_NOW + dt.timedelta(hours=2)
OTHER_SENDER_ID = SENDER_ID + 1
# take_at_once_attempts' bound; a sender counts twice (its recipient may be credited at once).
MAX_ATTEMPTS_PER_TRANSACTION = 60


def prepared(conn: psycopg.Connection, sender: int = SENDER_ID) -> dict[str, Any]:
    """A sender with 100, and one transfer of its locking 100 for the recipient."""
    insert_account(conn, DEBTOR_ID, sender, principal=100)
    transfer = prepare(conn, sender=sender, min_locked=100, max_locked=100, reachable=True)
    assert transfer is not None
    return transfer


def finalize_at_once(conn: psycopg.Connection, *senders: int) -> int:
    """The window's last call, by a consumer whose realm is the whole space."""
    return conn.execute(
        "SELECT finalize_at_once(%s, %s, %s, %s, %s)",
        ([DEBTOR_ID] * len(senders), list(senders), WHOLE_REALM.mask, WHOLE_REALM.realm, LATER),
    ).fetchone()[0]


def window(conn: psycopg.Connection, transfers: list[dict[str, Any]], amount: int = 40) -> int:
    """One transaction: the FinalizeTransfer intakes, then the window's last call."""
    with conn.transaction():
        for transfer in transfers:
            enqueue_finalize(conn, transfer, amount, note_format="text", note="rent", now=LATER, finalized_at_once=True)
        return finalize_at_once(conn, *dict.fromkeys(t["sender_creditor_id"] for t in transfers))


@pytest.fixture
def requests_listener(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN pyswpt_requests")
        yield listener


def wake_ups(listener: psycopg.Connection, database_url: str) -> list[str]:
    """The stages' wake-ups committed since the last look."""
    return notifications_so_far(listener, database_url, "pyswpt_requests")


def queued(conn: psycopg.Connection) -> list[tuple[int, int]]:
    found = rows(conn, "SELECT sender_creditor_id, transfer_id FROM finalization_request ORDER BY transfer_id")
    return [(row["sender_creditor_id"], row["transfer_id"]) for row in found]


def finalized(conn: psycopg.Connection) -> list[tuple[int, str]]:
    return [(row["sender_creditor_id"], row["status_code"]) for row in signals(conn, "finalized_transfer_signal")]


def test_a_free_sender_is_finalized_at_once_and_its_recipient_credited(conn, recipient):
    transfer = prepared(conn)
    assert window(conn, [transfer]) == 1
    assert queued(conn) == []
    assert finalized(conn) == [(SENDER_ID, "OK")]
    assert (account(conn, SENDER_ID)["principal"], account(conn, SENDER_ID)["total_locked_amount"]) == (60, 0)
    assert account(conn, RECIPIENT_ID)["principal"] == 40  # credited at once: nothing queued for it
    assert rows(conn, "SELECT * FROM pending_balance_change") == []
    [received] = [row for row in signals(conn, "account_transfer_signal") if row["creditor_id"] == RECIPIENT_ID]
    assert (received["acquired_amount"], received["transfer_note"]) == (40, "rent")


def test_the_window_finalizes_as_the_stage_would(conn, recipient):
    at_once, by_stage = prepared(conn), prepared(conn, sender=OTHER_SENDER_ID)
    window(conn, [at_once])
    enqueue_finalize(conn, by_stage, 40, note_format="text", note="rent", now=LATER)
    process_finalizations(conn, sender=OTHER_SENDER_ID, now=LATER, realm=WHOLE_REALM)

    def without_sender(row: dict[str, Any]) -> dict[str, Any]:
        names = ("sender_creditor_id", "creditor_id", "coordinator_id", "signal_id", "other_creditor_id")
        return {key: value for key, value in row.items() if key not in names}

    first, second = signals(conn, "finalized_transfer_signal")
    assert without_sender(first) == without_sender(second)
    assert without_sender(account(conn, SENDER_ID)) == without_sender(account(conn, OTHER_SENDER_ID))
    transfers = [row for row in signals(conn, "account_transfer_signal") if row["creditor_id"] != RECIPIENT_ID]
    assert len(transfers) == 2
    assert without_sender(transfers[0]) == without_sender(transfers[1])


def test_a_dismissal_is_finalized_at_once(conn, recipient):
    transfer = prepared(conn)
    assert window(conn, [transfer], amount=0) == 1
    assert finalized(conn) == [(SENDER_ID, "OK")]
    assert (account(conn, SENDER_ID)["principal"], account(conn, SENDER_ID)["total_locked_amount"]) == (100, 0)


def test_a_sender_held_by_another_transaction_keeps_its_requests_queued_without_waiting(conn, database_url, recipient):
    transfer = prepared(conn)
    # held_by_another_transaction makes a statement that waits for the lock fail (57014).
    with held_by_another_transaction(conn, database_url, SENDER_ID):
        assert window(conn, [transfer]) == 0
    assert queued(conn) == [(SENDER_ID, transfer["transfer_id"])]
    assert finalized(conn) == []
    assert process_finalizations(conn, now=LATER, realm=WHOLE_REALM) == 1
    assert finalized(conn) == [(SENDER_ID, "OK")]


def test_a_sender_changed_after_the_window_began_keeps_its_requests_queued(conn, database_url, recipient):
    # At REPEATABLE READ (the consumer's level) locking a row changed after the snapshot fails
    # with 40001; it must not fail the window.
    transfer = prepared(conn)
    enqueue_finalize(conn, transfer, 40, now=LATER)
    with changed_after_the_snapshot(conn, database_url, SENDER_ID):
        assert finalize_at_once(conn, SENDER_ID) == 0
    assert queued(conn) == [(SENDER_ID, transfer["transfer_id"])]


def test_requests_another_transaction_holds_are_left_to_it(conn, database_url, recipient):
    transfer = prepared(conn)
    enqueue_finalize(conn, transfer, 40, now=LATER)
    with psycopg.connect(database_url) as stage:
        # As a worker's take holds them, before it locks the account.
        stage.execute("SELECT 1 FROM pyswpt.finalization_request FOR UPDATE")
        conn.execute(f"SET statement_timeout = '{NO_WAIT_STATEMENT_TIMEOUT}'")
        assert finalize_at_once(conn, SENDER_ID) == 0
        conn.execute("RESET statement_timeout")
        stage.rollback()
    assert queued(conn) == [(SENDER_ID, transfer["transfer_id"])]
    assert finalized(conn) == []


def test_a_missing_senders_requests_are_deleted_as_by_the_stage(conn, recipient):
    transfer = prepared(conn)
    missing = transfer | {"sender_creditor_id": OTHER_SENDER_ID}
    assert window(conn, [missing]) == 1
    assert queued(conn) == []
    assert finalized(conn) == []


def test_an_error_on_the_senders_side_keeps_its_requests_queued_for_the_stage(conn, recipient):
    transfer = prepared(conn)
    with failing_account_writes(conn, SENDER_ID, "RAISE EXCEPTION 'the sender cannot be written';"):
        assert window(conn, [transfer]) == 0
        assert queued(conn) == [(SENDER_ID, transfer["transfer_id"])]
    assert process_finalizations(conn, now=LATER, realm=WHOLE_REALM) == 1
    assert finalized(conn) == [(SENDER_ID, "OK")]


def test_a_sender_counts_twice_against_the_attempts_that_prepares_share(conn, recipient):
    transfer = prepared(conn)
    other = prepared(conn, sender=OTHER_SENDER_ID)
    insert_account(conn, DEBTOR_ID, SENDER_ID + 2, principal=1000)
    with conn.transaction():
        # Prepares at once, by a sender with nothing queued, until two attempts are left.
        for request_id in range(MAX_ATTEMPTS_PER_TRANSACTION - 2):
            enqueue_prepare(
                conn,
                sender=SENDER_ID + 2,
                request_id=request_id,
                min_locked=1,
                max_locked=1,
                reachable=True,
                at_once_commit_period_seconds=COMMIT_PERIOD_SECONDS,
            )
        enqueue_finalize(conn, transfer, 40, now=LATER)
        enqueue_finalize(conn, other, 40, now=LATER)
        assert finalize_at_once(conn, SENDER_ID, OTHER_SENDER_ID) == 1
    assert queued(conn) == [(OTHER_SENDER_ID, other["transfer_id"])]
    assert finalized(conn) == [(SENDER_ID, "OK")]


def test_a_window_serves_at_most_30_senders_and_wakes_the_stage_for_the_others(
    conn, database_url, recipient, requests_listener
):
    senders = [SENDER_ID + i for i in range(MAX_ATTEMPTS_PER_TRANSACTION // 2 + 2)]
    transfers = [prepared(conn, sender=sender) for sender in senders]
    wake_ups(requests_listener, database_url)
    assert window(conn, transfers) == MAX_ATTEMPTS_PER_TRANSACTION // 2
    assert queued(conn) == [(t["sender_creditor_id"], t["transfer_id"]) for t in transfers[-2:]]
    assert wake_ups(requests_listener, database_url) == ["finalization_request"]


def test_a_window_that_finalizes_every_request_it_queued_does_not_wake_the_stage(
    conn, database_url, recipient, requests_listener
):
    transfers = [prepared(conn), prepared(conn, sender=OTHER_SENDER_ID)]
    wake_ups(requests_listener, database_url)
    assert window(conn, transfers) == 2
    assert queued(conn) == []
    assert wake_ups(requests_listener, database_url) == []


def test_a_window_that_leaves_a_request_queued_wakes_the_stage(conn, database_url, recipient, requests_listener):
    transfers = [prepared(conn), prepared(conn, sender=OTHER_SENDER_ID)]
    wake_ups(requests_listener, database_url)
    with held_by_another_transaction(conn, database_url, SENDER_ID):
        assert window(conn, transfers) == 1
    assert queued(conn) == [(SENDER_ID, transfers[0]["transfer_id"])]
    assert wake_ups(requests_listener, database_url) == ["finalization_request"]


def test_an_error_on_the_senders_side_wakes_the_stage(conn, database_url, recipient, requests_listener):
    transfer = prepared(conn)
    wake_ups(requests_listener, database_url)
    with failing_account_writes(conn, SENDER_ID, "RAISE EXCEPTION 'the sender cannot be written';"):
        assert window(conn, [transfer]) == 0
    assert wake_ups(requests_listener, database_url) == ["finalization_request"]


def test_an_intake_without_the_windows_last_call_wakes_the_stage(conn, database_url, recipient, requests_listener):
    transfer = prepared(conn)
    wake_ups(requests_listener, database_url)
    assert enqueue_finalize(conn, transfer, 40, now=LATER)
    assert wake_ups(requests_listener, database_url) == ["finalization_request"]
