"""The consumer's intake of PrepareTransfer and FinalizeTransfer: served at once when the
sender's account is free, queued for the stage when another transaction holds it
(receive_transfer_request, receive_finalization_request)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
import pytest
from factories import STATUS_DELETED, insert_account
from transfer_steps import (
    DEBTOR_ID,
    RECIPIENT_ID,
    SENDER_ID,
    account,
    assert_lock_invariants,
    enqueue_finalize,
    enqueue_prepare,
    prepare,
    prepared_transfers,
    process_finalizations,
    process_prepares,
    receive_finalize,
    receive_prepare,
    rows,
    signals,
)

from pyswpt.sharding import Realm

AGENT_A_CREDITOR = 0x000001FFFFFFFFFF
AGENT_B_CREDITOR = 0x0000020000000001


@pytest.fixture
def sender(conn):
    """A sender with 1000 in principal and a reachable recipient in this shard."""
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    return insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)


@contextlib.contextmanager
def sender_locked_elsewhere(conn: psycopg.Connection, database_url: str) -> Iterator[None]:
    """Another transaction holds the sender's lock; `conn` fails rather than wait for it."""
    with psycopg.connect(database_url) as holder:
        holder.execute(
            "SELECT 1 FROM pyswpt.account WHERE debtor_id = %s AND creditor_id = %s FOR NO KEY UPDATE",
            (DEBTOR_ID, SENDER_ID),
        )
        conn.execute("SET lock_timeout = '200ms'")
        yield
        holder.rollback()
    conn.execute("RESET lock_timeout")


def queued(conn: psycopg.Connection, table: str) -> list[dict]:
    return rows(conn, f"SELECT * FROM {table}")


def statuses(conn: psycopg.Connection) -> list[str]:
    return [row["status_code"] for row in signals(conn, "finalized_transfer_signal")]


# PrepareTransfer ----------------------------------------------------------------------------


def test_a_free_sender_is_served_at_once_with_nothing_queued(conn, sender):
    assert receive_prepare(conn, min_locked=10, max_locked=300) == "served"
    [prepared] = signals(conn, "prepared_transfer_signal")
    assert prepared["locked_amount"] == 300
    assert queued(conn, "transfer_request") == []
    assert account(conn, SENDER_ID)["total_locked_amount"] == 300
    assert_lock_invariants(conn)


def test_served_at_once_or_through_the_stage_the_transfer_is_the_same(conn, sender):
    insert_account(conn, DEBTOR_ID, SENDER_ID + 1, principal=1000)
    receive_prepare(conn, min_locked=10, max_locked=300, request_id=7)
    through_stage = prepare(conn, min_locked=10, max_locked=300, request_id=7, sender=SENDER_ID + 1)
    at_once, staged = prepared_transfers(conn)
    skipped = {"sender_creditor_id", "coordinator_id"}
    assert {k: v for k, v in at_once.items() if k not in skipped} == {
        k: v for k, v in staged.items() if k not in skipped
    }
    assert through_stage["locked_amount"] == 300


def test_a_busy_sender_gets_the_request_queued_without_waiting(conn, sender, database_url):
    with sender_locked_elsewhere(conn, database_url):
        assert receive_prepare(conn, min_locked=10, max_locked=300) == "queued"
    assert signals(conn, "prepared_transfer_signal") == []
    [request] = queued(conn, "transfer_request")
    assert (request["min_locked_amount"], request["max_locked_amount"]) == (10, 300)
    assert process_prepares(conn) == 1
    assert len(signals(conn, "prepared_transfer_signal")) == 1


def test_a_request_not_to_be_served_at_once_is_queued_though_the_sender_is_free(conn, sender):
    assert receive_prepare(conn, min_locked=10, max_locked=300, serve_at_once=False) == "queued"
    assert signals(conn, "prepared_transfer_signal") == []
    assert len(queued(conn, "transfer_request")) == 1


def test_requests_queued_while_the_sender_was_busy_are_served_first(conn, sender, database_url):
    with sender_locked_elsewhere(conn, database_url):
        receive_prepare(conn, min_locked=1000, max_locked=1000, request_id=1)
    assert receive_prepare(conn, min_locked=1, max_locked=1000, request_id=2) == "served"
    # The queued request, served first, took the whole principal.
    [prepared] = signals(conn, "prepared_transfer_signal")
    [rejected] = signals(conn, "rejected_transfer_signal")
    assert (prepared["coordinator_request_id"], prepared["locked_amount"]) == (1, 1000)
    assert (rejected["coordinator_request_id"], rejected["status_code"]) == (2, "INSUFFICIENT_AVAILABLE_AMOUNT")
    assert queued(conn, "transfer_request") == []


def test_a_redelivered_request_gets_its_prepared_transfer_again(conn, sender):
    receive_prepare(conn, min_locked=10, max_locked=300)
    receive_prepare(conn, min_locked=10, max_locked=300)
    first, second = signals(conn, "prepared_transfer_signal")
    assert first["transfer_id"] == second["transfer_id"]
    assert account(conn, SENDER_ID)["total_locked_amount"] == 300


def test_an_unreachable_recipient_is_rejected_at_once(conn, sender):
    assert receive_prepare(conn, recipient=999_999) == "rejected"
    [rejected] = signals(conn, "rejected_transfer_signal")
    assert rejected["status_code"] == "RECIPIENT_IS_UNREACHABLE"
    assert queued(conn, "transfer_request") == []


def test_a_missing_sender_is_queued_for_the_stage_which_rejects_it(conn):
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    assert receive_prepare(conn, max_locked=10) == "queued"
    process_prepares(conn)
    [rejected] = signals(conn, "rejected_transfer_signal")
    assert rejected["status_code"] == "SENDER_IS_UNREACHABLE"


def test_locked_amounts_out_of_order_are_refused_as_the_queue_refuses_them(conn, sender):
    with pytest.raises(psycopg.errors.CheckViolation):
        receive_prepare(conn, min_locked=20, max_locked=10)
    with pytest.raises(psycopg.errors.CheckViolation):
        enqueue_prepare(conn, min_locked=20, max_locked=10)


def test_a_deleted_sender_is_queued_without_holding_its_lock(conn, database_url):
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    insert_account(conn, DEBTOR_ID, SENDER_ID, status_flags=STATUS_DELETED)
    with conn.transaction():
        assert receive_prepare(conn, max_locked=10) == "queued"
        with psycopg.connect(database_url) as other:
            other.execute(
                "SELECT 1 FROM pyswpt.account WHERE debtor_id = %s AND creditor_id = %s FOR UPDATE NOWAIT",
                (DEBTOR_ID, SENDER_ID),
            )
    process_prepares(conn)
    [rejected] = signals(conn, "rejected_transfer_signal")
    assert rejected["status_code"] == "SENDER_IS_UNREACHABLE"


def test_an_agent_transfer_across_agents_served_at_once_is_rejected(conn):
    insert_account(conn, DEBTOR_ID, AGENT_B_CREDITOR)
    insert_account(conn, DEBTOR_ID, AGENT_A_CREDITOR)
    args = {"sender": AGENT_A_CREDITOR, "recipient": AGENT_B_CREDITOR, "coordinator_type": "agent"}
    assert receive_prepare(conn, **args) == "served"
    [rejected] = signals(conn, "rejected_transfer_signal")
    assert rejected["status_code"] == "RECIPIENT_IS_UNREACHABLE"


# FinalizeTransfer ---------------------------------------------------------------------------


@pytest.fixture
def transfer(conn, sender):
    """A transfer of the sender, prepared with 300 locked."""
    return prepare(conn, min_locked=300, max_locked=300)


def test_a_free_sender_is_finalized_at_once_with_nothing_queued(conn, transfer):
    realm = Realm.from_binding_key("#")
    assert receive_finalize(conn, transfer, 100, realm=realm) == "served"
    assert statuses(conn) == ["OK"]
    assert queued(conn, "finalization_request") == []
    assert prepared_transfers(conn) == []
    assert account(conn, SENDER_ID)["principal"] == 900
    # The recipient is in the realm: its change is queued here, not sent.
    [change] = queued(conn, "pending_balance_change")
    assert (change["creditor_id"], change["principal_delta"]) == (RECIPIENT_ID, 100)
    assert_lock_invariants(conn)


def test_a_busy_sender_gets_the_finalization_queued_without_waiting(conn, transfer, database_url):
    with sender_locked_elsewhere(conn, database_url):
        assert receive_finalize(conn, transfer, 100) == "queued"
    assert statuses(conn) == []
    assert len(queued(conn, "finalization_request")) == 1
    assert process_finalizations(conn) == 1
    assert statuses(conn) == ["OK"]


def test_a_finalization_not_to_be_served_at_once_is_queued_though_the_sender_is_free(conn, transfer):
    assert receive_finalize(conn, transfer, 100, serve_at_once=False) == "queued"
    assert statuses(conn) == []
    assert len(queued(conn, "finalization_request")) == 1


def test_a_request_queued_for_the_same_transfer_wins_over_the_new_one(conn, transfer, database_url):
    with sender_locked_elsewhere(conn, database_url):
        assert receive_finalize(conn, transfer, 100) == "queued"
        assert receive_finalize(conn, transfer, 300) == "repeat"
    assert receive_finalize(conn, transfer, 200) == "repeat"
    [finalized] = signals(conn, "finalized_transfer_signal")
    assert (finalized["status_code"], finalized["committed_amount"]) == ("OK", 100)
    assert account(conn, SENDER_ID)["principal"] == 900
    assert queued(conn, "finalization_request") == []


def test_finalizations_queued_while_the_sender_was_busy_are_served_too(conn, sender, database_url):
    first = prepare(conn, min_locked=100, max_locked=100, request_id=1)
    second = prepare(conn, min_locked=100, max_locked=100, request_id=2)
    with sender_locked_elsewhere(conn, database_url):
        receive_finalize(conn, first, 100)
    assert receive_finalize(conn, second, 0) == "served"
    assert sorted(statuses(conn)) == ["OK", "OK"]
    assert account(conn, SENDER_ID)["principal"] == 900
    assert queued(conn, "finalization_request") == []


def test_a_repeated_finalization_after_the_transfer_ended_changes_nothing(conn, transfer):
    receive_finalize(conn, transfer, 100)
    assert receive_finalize(conn, transfer, 100) == "served"
    assert statuses(conn) == ["OK"]
    assert account(conn, SENDER_ID)["principal"] == 900


def test_a_negative_committed_amount_is_refused_as_the_queue_refuses_it(conn, transfer):
    with pytest.raises(psycopg.errors.CheckViolation):
        receive_finalize(conn, transfer, -1)
    with pytest.raises(psycopg.errors.CheckViolation):
        enqueue_finalize(conn, transfer, -1)


@pytest.mark.parametrize("way", ["served", "queued"])
def test_the_last_call_of_a_window_carries_the_durability_barrier(conn, sender, database_url, way):
    conn.execute("SET synchronous_commit = off")  # as a consumer's session
    with contextlib.ExitStack() as stack:
        if way == "queued":
            stack.enter_context(sender_locked_elsewhere(conn, database_url))
        with conn.transaction():
            assert receive_prepare(conn, max_locked=10, request_id=1) == way
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
        with conn.transaction():
            assert receive_prepare(conn, max_locked=10, request_id=2, make_durable=True) == way
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    conn.execute("RESET synchronous_commit")
