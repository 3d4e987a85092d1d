"""A commit credits a recipient of the worker's realm in the finalizing transaction when the
recipient's account is free (try_to_credit_at_once), and queues the change for the
balance_changes stage otherwise: held by another transaction, changed since this one began,
with changes already queued, missing or deleted, or in a batch of more than one request.

The sender is locked when the recipient is tried, so the recipient's lock must never wait:
then the attempt adds no wait to any cycle of waits, and transactions cannot deadlock on
accounts (spec 02 §2.0's reason for one account per transaction, kept;
tests/sql/test_transfer_concurrency.py shows two accounts paying each other).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from factories import DEFAULT_NOW, failing_account_writes, insert_account
from transfer_steps import (  # noqa: F401 - recipient and transfer_invariants_hold are fixtures
    DEBTOR_ID,
    RECIPIENT_ID,
    SENDER_ID,
    WHOLE_REALM,
    account,
    changed_after_the_snapshot,
    enqueue_finalize,
    enqueue_prepare,
    held_by_another_transaction,
    prepare,
    process_finalizations,
    process_prepares,
    recipient,
    rows,
    signals,
    transfer_invariants_hold,
)

pytestmark = pytest.mark.usefixtures("transfer_invariants_hold")

LATER = DEFAULT_NOW + dt.timedelta(hours=2)
OTHER_SENDER_ID = SENDER_ID + 1
OTHER_RECIPIENT_ID = RECIPIENT_ID + 1


def prepared(conn: psycopg.Connection, sender: int = SENDER_ID, recipient: int = RECIPIENT_ID) -> dict[str, Any]:
    """A sender with 100, and one transfer of its locking 100 for `recipient`."""
    insert_account(conn, DEBTOR_ID, sender, principal=100)
    transfer = prepare(conn, sender=sender, recipient=recipient, min_locked=100, max_locked=100, reachable=True)
    assert transfer is not None
    return transfer


def commit(conn: psycopg.Connection, transfer: dict[str, Any], amount: int = 40) -> None:
    """The FinalizeTransfer intake and the sender's batch, by a worker whose realm is the whole space."""
    enqueue_finalize(conn, transfer, amount, note_format="text", note="rent", now=LATER)
    process_finalizations(conn, sender=transfer["sender_creditor_id"], now=LATER, realm=WHOLE_REALM)


def queued(conn: psycopg.Connection) -> list[tuple[int, int, int]]:
    """(recipient, sender, amount) of each change queued for the balance_changes stage."""
    found = rows(conn, "SELECT creditor_id, other_creditor_id, principal_delta FROM pending_balance_change")
    return sorted((row["creditor_id"], row["other_creditor_id"], row["principal_delta"]) for row in found)


def received(conn: psycopg.Connection, creditor_id: int = RECIPIENT_ID) -> list[dict[str, Any]]:
    return [row for row in signals(conn, "account_transfer_signal") if row["creditor_id"] == creditor_id]


def apply_queued(conn: psycopg.Connection, creditor_id: int = RECIPIENT_ID) -> int:
    return conn.execute("SELECT process_balance_changes(%s, %s, %s)", (DEBTOR_ID, creditor_id, LATER)).fetchone()[0]


def test_a_commit_credits_a_free_recipient_at_once(conn, recipient):
    transfer = prepared(conn)
    commit(conn, transfer)
    assert queued(conn) == []
    assert rows(conn, "SELECT * FROM registered_balance_change") == []
    assert signals(conn, "pending_balance_change_signal") == []
    credited = account(conn, RECIPIENT_ID)
    assert (credited["principal"], credited["interest"], credited["pending_account_update"]) == (40, 0.0, True)
    assert credited["last_change_seqnum"] == recipient["last_change_seqnum"] + 1
    assert credited["last_change_ts"] == LATER
    [transfer_row] = received(conn)
    assert {
        key: transfer_row[key]
        for key in ("acquired_amount", "other_creditor_id", "committed_at", "principal", "transfer_note")
    } == {
        "acquired_amount": 40,
        "other_creditor_id": SENDER_ID,
        "committed_at": LATER,
        "principal": 40,
        "transfer_note": "rent",
    }
    assert account(conn, SENDER_ID)["principal"] == 60


def test_crediting_at_once_leaves_what_the_stage_leaves(conn, database_url):
    # The same commit to two recipients alike, earning interest since long before, at
    # the same instant, one free and one held: the held one's change goes through the
    # queue, and both end the same.
    for creditor_id in (RECIPIENT_ID, OTHER_RECIPIENT_ID):
        insert_account(
            conn,
            DEBTOR_ID,
            creditor_id,
            now=DEFAULT_NOW - dt.timedelta(days=30),
            principal=1000,
            interest=2.5,
            interest_rate=5.0,
        )
    commit(conn, prepared(conn))
    with held_by_another_transaction(conn, database_url, OTHER_RECIPIENT_ID):
        commit(conn, prepared(conn, sender=OTHER_SENDER_ID, recipient=OTHER_RECIPIENT_ID))
    assert queued(conn) == [(OTHER_RECIPIENT_ID, OTHER_SENDER_ID, 40)]
    assert apply_queued(conn, OTHER_RECIPIENT_ID) == 1

    def comparable(row: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in row.items() if key not in ("creditor_id", "other_creditor_id")}

    assert comparable(account(conn, RECIPIENT_ID)) == comparable(account(conn, OTHER_RECIPIENT_ID))
    [at_once], [through_the_stage] = received(conn), received(conn, OTHER_RECIPIENT_ID)
    assert comparable(at_once) == comparable(through_the_stage)


def test_a_recipient_another_transaction_holds_is_queued_without_waiting(conn, database_url, recipient):
    transfer = prepared(conn)
    with held_by_another_transaction(conn, database_url, RECIPIENT_ID):
        commit(conn, transfer)
    assert queued(conn) == [(RECIPIENT_ID, SENDER_ID, 40)]
    [archived] = rows(conn, "SELECT is_applied FROM registered_balance_change")
    assert archived["is_applied"] is False
    assert account(conn, RECIPIENT_ID)["principal"] == 0
    assert apply_queued(conn) == 1
    assert account(conn, RECIPIENT_ID)["principal"] == 40


def test_a_recipient_changed_after_the_transaction_began_is_queued(conn, database_url, recipient):
    # At REPEATABLE READ (the drivers' level) locking a row changed after the snapshot
    # fails with 40001; it must not fail the sender's finalization.
    transfer = prepared(conn)
    enqueue_finalize(conn, transfer, 40, now=LATER)
    with changed_after_the_snapshot(conn, database_url, RECIPIENT_ID):
        assert process_finalizations(conn, now=LATER, realm=WHOLE_REALM) == 1
    assert queued(conn) == [(RECIPIENT_ID, SENDER_ID, 40)]
    assert account(conn, SENDER_ID)["principal"] == 60


def test_a_recipient_with_queued_changes_gets_the_next_one_queued_behind_them(conn, database_url, recipient):
    first = prepared(conn)
    with held_by_another_transaction(conn, database_url, RECIPIENT_ID):
        commit(conn, first, 10)
    commit(conn, prepared(conn, sender=OTHER_SENDER_ID), 20)
    assert queued(conn) == [(RECIPIENT_ID, SENDER_ID, 10), (RECIPIENT_ID, OTHER_SENDER_ID, 20)]
    assert apply_queued(conn) == 2
    assert [(row["acquired_amount"], row["principal"]) for row in received(conn)] == [(10, 10), (20, 30)]


def test_a_deleted_recipient_is_queued_for_the_stage_to_bring_back(conn, recipient):
    transfer = prepared(conn)
    conn.execute(
        "UPDATE account SET status_flags = with_deleted_flag(status_flags) WHERE debtor_id = %s AND creditor_id = %s",
        (DEBTOR_ID, RECIPIENT_ID),
    )
    commit(conn, transfer)
    assert queued(conn) == [(RECIPIENT_ID, SENDER_ID, 40)]
    assert apply_queued(conn) == 1
    assert account(conn, RECIPIENT_ID)["principal"] == 40


def test_a_failure_on_the_recipients_side_queues_the_change_and_spares_the_sender(conn, recipient):
    # The failure stays with the recipient's account, in the stage, as before crediting at once.
    transfer = prepared(conn)
    with failing_account_writes(conn, RECIPIENT_ID, "RAISE EXCEPTION 'the recipient cannot be written';"):
        commit(conn, transfer)
        assert queued(conn) == [(RECIPIENT_ID, SENDER_ID, 40)]
        assert [row["status_code"] for row in signals(conn, "finalized_transfer_signal")] == ["OK"]
        assert received(conn) == []
        with pytest.raises(psycopg.errors.RaiseException):
            apply_queued(conn)
    assert apply_queued(conn) == 1
    assert account(conn, RECIPIENT_ID)["principal"] == 40


def test_a_batch_of_two_commits_queues_both_changes(conn, recipient):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100)
    for request_id in (1, 2):
        enqueue_prepare(conn, min_locked=50, max_locked=50, request_id=request_id, reachable=True)
    process_prepares(conn)
    for transfer in signals(conn, "prepared_transfer_signal"):
        enqueue_finalize(conn, transfer, 30, now=LATER)
    assert process_finalizations(conn, now=LATER, realm=WHOLE_REALM) == 2
    assert queued(conn) == [(RECIPIENT_ID, SENDER_ID, 30), (RECIPIENT_ID, SENDER_ID, 30)]


def test_without_a_realm_the_change_goes_through_the_outbox(conn, recipient):
    transfer = prepared(conn)
    enqueue_finalize(conn, transfer, 40, now=LATER)
    process_finalizations(conn, now=LATER)
    [change] = signals(conn, "pending_balance_change_signal")
    assert (change["creditor_id"], change["principal_delta"]) == (RECIPIENT_ID, 40)
    assert account(conn, RECIPIENT_ID)["principal"] == 0


def test_a_missing_recipient_is_queued_for_the_stage_to_create(conn):
    transfer = prepared(conn)
    commit(conn, transfer)
    assert queued(conn) == [(RECIPIENT_ID, SENDER_ID, 40)]
    assert apply_queued(conn) == 1
    assert account(conn, RECIPIENT_ID)["principal"] == 40


def test_the_root_account_is_credited_at_once_without_an_account_transfer(conn):
    root = insert_account(conn, DEBTOR_ID, 0, principal=-100)
    commit(conn, prepared(conn, recipient=0))
    assert queued(conn) == []
    credited = account(conn, 0)
    assert (credited["principal"], credited["last_change_seqnum"]) == (-60, root["last_change_seqnum"] + 1)
    assert received(conn, 0) == []


def test_a_dismissal_leaves_the_recipient_alone(conn, recipient):
    commit(conn, prepared(conn), 0)
    assert account(conn, RECIPIENT_ID) == recipient
    assert queued(conn) == []


@pytest.fixture
def multixact_row_versions(conn: psycopg.Connection) -> Iterator[Callable[[], int]]:
    """Counts the versions of account rows whose xmax is a MultiXact (pageinspect, PostgreSQL's
    contrib, installed for the test only)."""
    conn.execute("CREATE EXTENSION pageinspect SCHEMA public")
    try:
        yield lambda: conn.execute(
            """
            SELECT count(*)
            FROM generate_series(0, pg_relation_size('pyswpt.account') / current_setting('block_size')::int - 1) AS b,
                LATERAL public.heap_page_items(public.get_raw_page('pyswpt.account', b::int)) AS t
            WHERE t.t_infomask & 4096 <> 0  -- HEAP_XMAX_IS_MULTI
            """
        ).fetchone()[0]
    finally:
        conn.execute("DROP EXTENSION pageinspect")


def test_crediting_at_once_makes_no_multixact(conn, recipient, multixact_row_versions):
    # A row locked by a subtransaction and updated by its parent would need one.
    commit(conn, prepared(conn))
    assert account(conn, RECIPIENT_ID)["principal"] == 40
    assert multixact_row_versions() == 0
