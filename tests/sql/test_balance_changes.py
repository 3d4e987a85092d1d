"""Pending balance changes (spec 02 §2.6) and debtor payments (§2.16, B6):
intake, processing, and the edge cases 12-18 of spec 02 §6."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import time

import psycopg
import pytest
from balance_steps import (
    DAY,
    MAX_INT32,
    MAX_INT64,
    MIN_INT32,
    account,
    deliver_pending_balance_changes,
    pay,
    process_changes,
    register_change,
    rows,
    signals,
    value,
)
from factories import (
    CONFIG_SCHEDULED_FOR_DELETION,
    DEFAULT_NOW,
    STATUS_DELETED,
    STATUS_OVERFLOWN,
    insert_account,
)

from pyswpt import db, schema

NOW = DEFAULT_NOW
DEBTOR_ID = 1
CREDITOR_ID = 1
OTHER_ID = 777
LOCK_WAIT_SECONDS = 10.0


def archive(conn):
    return rows(conn, "SELECT * FROM registered_balance_change ORDER BY other_creditor_id, change_id")


def queued(conn):
    return rows(conn, "SELECT * FROM pending_balance_change ORDER BY other_creditor_id, change_id")


# Intake ------------------------------------------------------------------------


def test_new_change_is_archived_unapplied_and_queued(conn):
    assert register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, change_id=5, note_format="fmt", note="hi")
    [archived] = archive(conn)
    assert (archived["other_creditor_id"], archived["change_id"], archived["is_applied"]) == (OTHER_ID, 5, False)
    assert archived["committed_at"] == NOW
    [change] = queued(conn)
    assert change["creditor_id"] == CREDITOR_ID
    assert change["principal_delta"] == 100
    assert (change["transfer_note_format"], change["transfer_note"]) == ("fmt", "hi")


def test_change_committed_before_archive_threshold_is_dropped(conn):
    assert not register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, committed_at=NOW - DAY, threshold=NOW)
    assert archive(conn) == []
    assert queued(conn) == []


def test_change_committed_at_the_archive_threshold_is_accepted(conn):
    assert register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, committed_at=NOW, threshold=NOW)


def test_duplicate_change_is_dropped_while_queued(conn):
    assert register_change(conn, DEBTOR_ID, CREDITOR_ID, 100)
    assert not register_change(conn, DEBTOR_ID, CREDITOR_ID, 100)
    assert len(queued(conn)) == 1


def test_redelivered_change_is_applied_once(conn):
    assert register_change(conn, DEBTOR_ID, CREDITOR_ID, 100)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    assert not register_change(conn, DEBTOR_ID, CREDITOR_ID, 100)
    assert process_changes(conn, DEBTOR_ID, CREDITOR_ID) == 0
    assert account(conn, DEBTOR_ID, CREDITOR_ID)["principal"] == 100


def test_same_change_id_from_another_sender_is_a_different_change(conn):
    assert register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, other_creditor_id=5)
    assert register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, other_creditor_id=6)
    assert len(queued(conn)) == 2


def test_concurrent_twin_registration_is_a_serialization_failure(database_url):
    intake = (
        f"SET search_path = {schema.OWNER_SEARCH_PATH}; "
        "SELECT register_balance_change(1, 777, 1, 1, 'direct', '', '', now(), 100, '1970-01-01Z')"
    )
    with db.connect(database_url) as first, db.connect(database_url) as second:
        first.execute(intake)  # uncommitted: the twin must wait on the unique key
        second_pid = second.info.backend_pid
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            twin = pool.submit(second.execute, intake)
            wait_until_blocked(first, second_pid)
            first.commit()
            with pytest.raises(psycopg.errors.SerializationFailure):
                twin.result(timeout=LOCK_WAIT_SECONDS)


def wait_until_blocked(observer: psycopg.Connection, pid: int) -> None:
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while time.monotonic() < deadline:
        waiting = observer.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", (pid,)).fetchone()[0]
        if waiting:
            return
        time.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for a lock")


# Processing ------------------------------------------------------------------------


def test_processing_nothing_creates_nothing(conn):
    assert process_changes(conn, DEBTOR_ID, CREDITOR_ID) == 0
    assert account(conn, DEBTOR_ID, CREDITOR_ID) is None
    assert signals(conn, "account_update_signal") == []


def test_processing_creates_a_missing_account_and_announces_it(conn):
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100)
    assert process_changes(conn, DEBTOR_ID, CREDITOR_ID) == 1
    [update] = signals(conn, "account_update_signal")
    assert (update["last_change_seqnum"], update["principal"], update["inserted_at"]) == (0, 0, NOW)
    created = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert created["creation_date"] == NOW.date()
    assert (created["principal"], created["last_change_seqnum"]) == (100, 1)
    assert created["pending_account_update"] is True


def test_applied_changes_are_marked_in_the_archive_and_dequeued(conn):
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, change_id=1)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 50, change_id=2)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    assert [a["is_applied"] for a in archive(conn)] == [True, True]
    assert queued(conn) == []


def test_changes_of_other_accounts_are_left_queued(conn):
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, change_id=1)
    register_change(conn, DEBTOR_ID, CREDITOR_ID + 1, 50, change_id=2)
    assert process_changes(conn, DEBTOR_ID, CREDITOR_ID) == 1
    assert [(q["creditor_id"], q["change_id"]) for q in queued(conn)] == [(CREDITOR_ID + 1, 2)]
    assert [a["is_applied"] for a in archive(conn)] == [True, False]


def test_batch_changes_balance_once_without_account_update(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=NOW - DAY, principal=10, last_change_seqnum=7)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, change_id=1)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, -30, change_id=2)
    assert process_changes(conn, DEBTOR_ID, CREDITOR_ID) == 2
    changed = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (changed["principal"], changed["last_change_seqnum"]) == (80, 8)
    assert changed["last_change_ts"] == NOW
    assert changed["pending_account_update"] is True
    assert signals(conn, "account_update_signal") == []


def test_each_change_is_reported_with_the_running_principal_and_its_commit_time(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, principal=10, last_transfer_number=4)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, change_id=1, committed_at=NOW - 2 * DAY, note="a")
    register_change(conn, DEBTOR_ID, CREDITOR_ID, -30, change_id=2, committed_at=NOW - DAY, note="b")
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    transfers = signals(conn, "account_transfer_signal")
    assert [
        (t["transfer_number"], t["previous_transfer_number"], t["acquired_amount"], t["principal"], t["transfer_note"])
        for t in transfers
    ] == [(5, 4, 100, 110, "a"), (6, 5, -30, 80, "b")]
    assert [t["committed_at"] for t in transfers] == [NOW - 2 * DAY, NOW - DAY]
    assert all(t["other_creditor_id"] == OTHER_ID and t["inserted_at"] == NOW for t in transfers)
    changed = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (changed["last_transfer_number"], changed["last_transfer_committed_at"]) == (6, NOW - DAY)


def test_negligible_incoming_change_is_not_reported_and_takes_no_number(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, negligible_amount=100.0)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    assert signals(conn, "account_transfer_signal") == []
    changed = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (changed["principal"], changed["last_transfer_number"]) == (100, 0)


def test_incoming_change_above_the_negligible_amount_is_reported(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, negligible_amount=100.0)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 101)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    assert [t["acquired_amount"] for t in signals(conn, "account_transfer_signal")] == [101]


def test_negligible_agent_change_is_still_reported(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, negligible_amount=100.0)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100, coordinator_type="agent")
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    assert [t["transfer_number"] for t in signals(conn, "account_transfer_signal")] == [1]


def test_outgoing_change_is_never_negligible(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, principal=500, negligible_amount=100.0)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, -100)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    assert [t["acquired_amount"] for t in signals(conn, "account_transfer_signal")] == [-100]


def test_root_account_gets_no_account_transfer(conn):
    register_change(conn, DEBTOR_ID, 0, -100)
    process_changes(conn, DEBTOR_ID, 0)
    assert signals(conn, "account_transfer_signal") == []
    assert account(conn, DEBTOR_ID, 0)["principal"] == -100


def test_overflowing_changes_are_contained_and_flag_the_account(conn):
    register_change(conn, DEBTOR_ID, CREDITOR_ID, MAX_INT64, change_id=1)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, MAX_INT64, change_id=2)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    changed = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert changed["principal"] == MAX_INT64
    assert changed["status_flags"] & STATUS_OVERFLOWN
    assert [t["principal"] for t in signals(conn, "account_transfer_signal")] == [MAX_INT64, MAX_INT64]


def test_seqnum_wraps_when_a_batch_is_applied(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, last_change_seqnum=MAX_INT32)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    assert account(conn, DEBTOR_ID, CREDITOR_ID)["last_change_seqnum"] == MIN_INT32


def test_edge_17_due_interest_credits_what_the_amount_earned_since_commit(conn):
    insert_account(
        conn,
        DEBTOR_ID,
        CREDITOR_ID,
        previous_interest_rate=5.0,
        interest_rate=15.0,
        last_interest_rate_change_ts=NOW - 183 * DAY,
        last_transfer_number=3,
    )
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 1000, committed_at=NOW - dt.timedelta(days=356.25))
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    changed = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert changed["principal"] == 1000
    assert 95 < changed["interest"] <= 100
    assert changed["interest"] == pytest.approx(97.64528106250681, abs=1e-9)
    assert changed["last_transfer_number"] == 4


def test_due_interest_is_debited_for_an_outgoing_change(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, principal=5000, interest_rate=10.0, last_change_ts=NOW)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, -1000, committed_at=NOW - 365 * DAY)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    assert account(conn, DEBTOR_ID, CREDITOR_ID)["interest"] == pytest.approx(-99.928, abs=1e-3)


def test_edge_27_incoming_change_resurrects_a_deleted_account(conn):
    insert_account(
        conn,
        DEBTOR_ID,
        CREDITOR_ID,
        now=NOW - 10 * DAY,
        status_flags=STATUS_DELETED,
        config_flags=CONFIG_SCHEDULED_FOR_DELETION,
        interest_rate=7.0,
        last_change_seqnum=3,
    )
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    revived = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert revived["status_flags"] & STATUS_DELETED == 0
    assert revived["config_flags"] == CONFIG_SCHEDULED_FOR_DELETION
    assert revived["interest_rate"] == 7.0
    assert revived["principal"] == 100
    assert revived["creation_date"] == (NOW - 10 * DAY).date()
    [update] = signals(conn, "account_update_signal")
    assert (update["last_change_seqnum"], update["last_change_ts"]) == (4, NOW)
    assert value(conn, "SELECT (lock_existing_account(%s, %s)).creditor_id", (DEBTOR_ID, CREDITOR_ID)) == CREDITOR_ID


def test_batch_takes_changes_in_commit_order(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 1, change_id=1, committed_at=NOW - DAY)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 2, change_id=2, committed_at=NOW - 3 * DAY)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 3, change_id=3, committed_at=NOW - 2 * DAY)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    assert [t["acquired_amount"] for t in signals(conn, "account_transfer_signal")] == [2, 3, 1]


# Debtor payments (B6, §2.16) and edge cases 12-16 ---------------------------------------


def test_edge_12_negligible_debtor_payment_moves_money_without_account_transfer(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, negligible_amount=50000.0)
    pay(conn, DEBTOR_ID, CREDITOR_ID, 50000)
    [change] = signals(conn, "pending_balance_change_signal")
    assert (change["creditor_id"], change["other_creditor_id"], change["principal_delta"]) == (0, CREDITOR_ID, -50000)
    assert (change["coordinator_type"], change["committed_at"]) == ("test", NOW)
    paid = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (paid["principal"], paid["interest"]) == (50000, 0.0)
    assert signals(conn, "account_transfer_signal") == []


def test_edge_12_outgoing_debtor_payment_is_reported(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, negligible_amount=50000.0)
    pay(conn, DEBTOR_ID, CREDITOR_ID, -50000)
    [transfer] = signals(conn, "account_transfer_signal")
    assert (transfer["transfer_number"], transfer["previous_transfer_number"]) == (1, 0)
    assert (transfer["acquired_amount"], transfer["principal"]) == (-50000, -50000)
    # acquired < 0: the account is the sender ("1") and the root the recipient ("0").
    assert (transfer["creditor_id"], transfer["other_creditor_id"]) == (CREDITOR_ID, 0)


def test_edge_12_second_payment_reports_the_running_principal(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)
    pay(conn, DEBTOR_ID, CREDITOR_ID, -50000)
    pay(conn, DEBTOR_ID, CREDITOR_ID, -100000)
    assert [t["principal"] for t in signals(conn, "account_transfer_signal")] == [-50000, -150000]


def test_edge_13_zero_payment_moves_nothing(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, principal=5)
    pay(conn, DEBTOR_ID, CREDITOR_ID, 0)
    assert signals(conn, "pending_balance_change_signal") == []
    assert signals(conn, "account_transfer_signal") == []
    unchanged = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (unchanged["principal"], unchanged["last_change_seqnum"]) == (5, 0)


@pytest.mark.parametrize("amount", [50000, -50000])
def test_edge_14_interest_payment_moves_interest_into_principal(conn, amount):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)
    pay(conn, DEBTOR_ID, CREDITOR_ID, amount, coordinator_type="interest")
    paid = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (paid["principal"], paid["interest"]) == (amount, -amount)


@pytest.mark.parametrize(("first", "second"), [(MAX_INT64, 1), (-MAX_INT64, -2)])
def test_edge_15_overflowing_payments_set_the_overflown_bit(conn, first, second):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)
    pay(conn, DEBTOR_ID, CREDITOR_ID, first)
    assert account(conn, DEBTOR_ID, CREDITOR_ID)["status_flags"] & STATUS_OVERFLOWN == 0
    pay(conn, DEBTOR_ID, CREDITOR_ID, second)
    paid = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert paid["status_flags"] & STATUS_OVERFLOWN
    assert paid["principal"] == (MAX_INT64 if first > 0 else -MAX_INT64)


def test_edge_16_payment_reports_at_once_and_root_is_created_by_its_change(conn):
    pay(conn, DEBTOR_ID, CREDITOR_ID, 10000)
    [transfer] = signals(conn, "account_transfer_signal")
    assert (transfer["acquired_amount"], transfer["principal"]) == (10000, 10000)
    assert account(conn, DEBTOR_ID, 0) is None
    deliver_pending_balance_changes(conn)
    assert account(conn, DEBTOR_ID, 0)["principal"] == -10000


def test_payment_to_a_root_account_does_nothing(conn):
    insert_account(conn, DEBTOR_ID, 0, principal=5)
    pay(conn, DEBTOR_ID, 0, 100)
    assert signals(conn, "pending_balance_change_signal") == []
    assert account(conn, DEBTOR_ID, 0)["principal"] == 5


@pytest.mark.parametrize("coordinator_type", ["direct", "agent"])
def test_direct_payment_refuses_transfer_coordinator_types(conn, coordinator_type):
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        pay(conn, DEBTOR_ID, CREDITOR_ID, 100, coordinator_type=coordinator_type)
    assert account(conn, DEBTOR_ID, CREDITOR_ID) is None


def test_conservation_principals_sum_to_zero_after_payments_reach_the_root(conn):
    pay(conn, DEBTOR_ID, CREDITOR_ID, 10000)
    pay(conn, DEBTOR_ID, CREDITOR_ID + 1, -2500)
    pay(conn, DEBTOR_ID, CREDITOR_ID, 333, coordinator_type="interest")
    assert value(conn, "SELECT sum(principal) FROM account WHERE debtor_id = %s", (DEBTOR_ID,)) != 0
    deliver_pending_balance_changes(conn)
    assert value(conn, "SELECT sum(principal) FROM account WHERE debtor_id = %s", (DEBTOR_ID,)) == 0
