"""PrepareTransfer: intake and the per-sender batch (spec 02 §2.4, §6 edge cases 28-36)."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from factories import CONFIG_SCHEDULED_FOR_DELETION, DEFAULT_NOW, STATUS_DELETED, T0, insert_account
from transfer_steps import (
    COMMIT_PERIOD_SECONDS,
    DAY,
    DEBTOR_ID,
    MAX_INT32,
    MAX_INT64,
    RECIPIENT_ID,
    SENDER_ID,
    T_INFINITY,
    account,
    assert_lock_invariants,
    enqueue_prepare,
    prepare,
    prepared_transfers,
    process_prepares,
    rows,
    signals,
    value,
)

AGENT_A_CREDITOR = 0x000001FFFFFFFFFF
AGENT_A_OTHER_CREDITOR = 0x0000010000001234
AGENT_B_CREDITOR = 0x0000020000000001


def rejections(conn: psycopg.Connection) -> list[tuple[str, int]]:
    return [(row["status_code"], row["total_locked_amount"]) for row in signals(conn, "rejected_transfer_signal")]


def queued_requests(conn: psycopg.Connection) -> list[dict]:
    return rows(conn, "SELECT * FROM transfer_request ORDER BY transfer_request_id")


@pytest.fixture
def sender(conn):
    """A sender with 1000 in principal and a reachable recipient in this shard."""
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    return insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)


# Intake ---------------------------------------------------------------------------


def test_unparsable_recipient_is_rejected_at_once_with_total_zero(conn, sender):
    assert enqueue_prepare(conn, recipient=None, min_locked=1, max_locked=1, now=DEFAULT_NOW) is False
    assert queued_requests(conn) == []
    [rejected] = signals(conn, "rejected_transfer_signal")
    assert (rejected["status_code"], rejected["total_locked_amount"]) == ("RECIPIENT_IS_UNREACHABLE", 0)
    assert rejected["inserted_at"] == DEFAULT_NOW
    assert (rejected["debtor_id"], rejected["sender_creditor_id"]) == (DEBTOR_ID, SENDER_ID)
    assert (rejected["coordinator_type"], rejected["coordinator_id"], rejected["coordinator_request_id"]) == (
        "direct",
        SENDER_ID,
        1,
    )


def test_recipient_without_account_in_this_shard_is_unreachable(conn, sender):
    assert enqueue_prepare(conn, recipient=RECIPIENT_ID + 1) is False
    assert rejections(conn) == [("RECIPIENT_IS_UNREACHABLE", 0)]


def test_recipient_scheduled_for_deletion_is_unreachable(conn):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    assert enqueue_prepare(conn) is False
    assert rejections(conn) == [("RECIPIENT_IS_UNREACHABLE", 0)]


def test_missing_root_account_is_a_reachable_recipient(conn, sender):
    assert enqueue_prepare(conn, recipient=0) is True
    assert len(queued_requests(conn)) == 1


def test_reachable_recipient_queues_the_request_with_its_fields(conn, sender):
    assert enqueue_prepare(conn, min_locked=5, max_locked=7, request_id=42, final_interest_rate_ts=T0) is True
    [request] = queued_requests(conn)
    assert request["min_locked_amount"] == 5
    assert request["max_locked_amount"] == 7
    assert request["coordinator_request_id"] == 42
    assert request["recipient_creditor_id"] == RECIPIENT_ID
    assert request["final_interest_rate_ts"] == T0
    assert signals(conn, "rejected_transfer_signal") == []


def test_driver_decision_of_reachable_skips_the_lookup(conn, sender):
    # Agent transfers and recipients of other shards are decided by the driver.
    assert enqueue_prepare(conn, recipient=RECIPIENT_ID + 1, reachable=True) is True
    assert len(queued_requests(conn)) == 1


def test_driver_decision_of_unreachable_rejects_an_existing_recipient(conn, sender):
    assert enqueue_prepare(conn, reachable=False) is False
    assert rejections(conn) == [("RECIPIENT_IS_UNREACHABLE", 0)]


def test_unreachable_recipient_is_rejected_before_any_sender_check(conn):
    # Edge case 33: the sender would fail TOO_MANY_TRANSFERS, but is never looked at.
    insert_account(conn, DEBTOR_ID, SENDER_ID, pending_transfers_count=MAX_INT32, total_locked_amount=5)
    enqueue_prepare(conn, recipient=None)
    process_prepares(conn)
    assert rejections(conn) == [("RECIPIENT_IS_UNREACHABLE", 0)]


def test_request_deadline_is_message_ts_plus_max_commit_delay(conn, sender):
    ts = DEFAULT_NOW - dt.timedelta(hours=1)
    enqueue_prepare(conn, ts=ts, max_commit_delay_seconds=3600 * 5)
    [request] = queued_requests(conn)
    assert request["deadline"] == ts + dt.timedelta(hours=5)


def test_deadline_past_year_9999_is_capped_instead_of_raising(conn, sender):
    ts = dt.datetime(9999, 12, 31, 23, 0, tzinfo=dt.UTC)
    assert enqueue_prepare(conn, ts=ts, max_commit_delay_seconds=MAX_INT32) is True
    [request] = queued_requests(conn)
    assert request["deadline"] == T_INFINITY


def test_intake_takes_no_account_lock(conn, sender, database_url):
    with psycopg.connect(database_url) as holder:
        holder.execute(
            "SELECT 1 FROM pyswpt.account WHERE debtor_id = %s AND creditor_id IN (%s, %s) FOR UPDATE",
            (DEBTOR_ID, SENDER_ID, RECIPIENT_ID),
        )
        conn.execute("SET lock_timeout = '200ms'")
        assert enqueue_prepare(conn) is True
        assert enqueue_prepare(conn, recipient=None) is False
        holder.rollback()


# Batch: rejections in the order of spec 02 §2.4 ------------------------------------------


def test_missing_sender_is_rejected_as_sender_unreachable(conn):
    # Edge case 28.
    enqueue_prepare(conn, recipient=0, min_locked=0, max_locked=10)
    assert process_prepares(conn) == 1
    assert rejections(conn) == [("SENDER_IS_UNREACHABLE", 0)]
    assert prepared_transfers(conn) == []
    assert queued_requests(conn) == []


def test_deleted_sender_is_rejected_as_sender_unreachable(conn):
    insert_account(conn, DEBTOR_ID, SENDER_ID, status_flags=STATUS_DELETED, total_locked_amount=0)
    enqueue_prepare(conn, recipient=0)
    process_prepares(conn)
    assert rejections(conn) == [("SENDER_IS_UNREACHABLE", 0)]


def test_zero_balance_with_min_one_is_insufficient_with_total_zero(conn):
    # Edge case 29.
    insert_account(conn, DEBTOR_ID, SENDER_ID)
    prepare(conn, recipient=0, min_locked=1, max_locked=1)
    assert rejections(conn) == [("INSUFFICIENT_AVAILABLE_AMOUNT", 0)]
    assert signals(conn, "account_update_signal") == []
    assert signals(conn, "account_transfer_signal") == []
    assert prepared_transfers(conn) == []


def test_recipient_same_as_sender_is_rejected_with_current_total(conn):
    # Edge case 30.
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)
    prepare(conn, recipient=0, min_locked=30, max_locked=30, request_id=1)
    prepare(conn, recipient=SENDER_ID, min_locked=1, max_locked=1, request_id=2)
    assert rejections(conn) == [("RECIPIENT_SAME_AS_SENDER", 30)]


def test_too_many_pending_transfers_is_rejected_with_current_total(conn):
    # Edge case 31.
    insert_account(
        conn, DEBTOR_ID, SENDER_ID, principal=1000, pending_transfers_count=MAX_INT32, total_locked_amount=77
    )
    prepare(conn, recipient=0, min_locked=1, max_locked=1)
    assert rejections(conn) == [("TOO_MANY_TRANSFERS", 77)]
    assert account(conn, SENDER_ID)["pending_transfers_count"] == MAX_INT32


def test_agent_transfer_within_one_agent_is_prepared_without_funds(conn):
    # Edge case 32: the recipient need not exist; min = max = 0 needs no funds.
    insert_account(conn, DEBTOR_ID, AGENT_A_CREDITOR)
    prepared = prepare(
        conn,
        sender=AGENT_A_CREDITOR,
        recipient=AGENT_A_OTHER_CREDITOR,
        coordinator_type="agent",
        reachable=True,
    )
    assert prepared is not None
    assert prepared["locked_amount"] == 0
    assert prepared["recipient_creditor_id"] == AGENT_A_OTHER_CREDITOR
    assert_lock_invariants(conn)


def test_agent_transfer_across_agents_is_rejected_as_recipient_unreachable(conn):
    # Edge case 32.
    insert_account(conn, DEBTOR_ID, AGENT_B_CREDITOR, total_locked_amount=0, principal=100)
    prepare(
        conn,
        sender=AGENT_B_CREDITOR,
        recipient=AGENT_A_OTHER_CREDITOR,
        coordinator_type="agent",
        reachable=True,
    )
    assert rejections(conn) == [("RECIPIENT_IS_UNREACHABLE", 0)]


def test_agent_prefix_zero_is_not_an_agent(conn):
    insert_account(conn, DEBTOR_ID, 5, principal=100)
    prepare(conn, sender=5, recipient=6, coordinator_type="agent", reachable=True)
    assert rejections(conn) == [("RECIPIENT_IS_UNREACHABLE", 0)]


def test_newer_interest_rate_than_the_client_knew_is_rejected(conn):
    # Edge case 34.
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000, last_interest_rate_change_ts=T0)
    prepare(conn, recipient=0, max_locked=10, final_interest_rate_ts=T0 - dt.timedelta(minutes=1))
    assert rejections(conn) == [("NEWER_INTEREST_RATE", 0)]


def test_rate_change_at_the_known_instant_is_not_newer(conn):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000, last_interest_rate_change_ts=T0)
    assert prepare(conn, recipient=0, max_locked=10, final_interest_rate_ts=T0) is not None


@pytest.mark.parametrize(
    ("sender_columns", "request_fields", "expected"),
    [
        # agent mismatch before too many transfers
        (
            {"pending_transfers_count": MAX_INT32},
            {"coordinator_type": "agent", "recipient": AGENT_B_CREDITOR},
            "RECIPIENT_IS_UNREACHABLE",
        ),
        # too many transfers before recipient same as sender
        ({"pending_transfers_count": MAX_INT32}, {"recipient": SENDER_ID}, "TOO_MANY_TRANSFERS"),
        # recipient same as sender before newer interest rate
        ({"last_interest_rate_change_ts": DEFAULT_NOW + DAY}, {"recipient": SENDER_ID}, "RECIPIENT_SAME_AS_SENDER"),
        # newer interest rate before insufficient amount
        ({"last_interest_rate_change_ts": DEFAULT_NOW + DAY, "principal": 0}, {}, "NEWER_INTEREST_RATE"),
    ],
)
def test_first_failing_check_in_spec_order_decides(conn, sender_columns, request_fields, expected):
    insert_account(conn, DEBTOR_ID, SENDER_ID, **sender_columns)
    prepare(conn, min_locked=10, max_locked=10, reachable=True, **{"recipient": 0, **request_fields})
    assert [status for status, _ in rejections(conn)] == [expected]


# Batch: what is locked -------------------------------------------------------------------


def test_principal_100_with_max_200_locks_100(conn):
    # Edge case 35, exactly.
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100)
    prepared = prepare(conn, recipient=RECIPIENT_ID, reachable=True, min_locked=0, max_locked=200)
    assert prepared["locked_amount"] == 100
    assert prepared["recipient_creditor_id"] == RECIPIENT_ID
    assert prepared["inserted_at"] == prepared["prepared_at"] == DEFAULT_NOW
    assert prepared["demurrage_rate"] == -50.0
    sender_after = account(conn, SENDER_ID)
    assert (sender_after["total_locked_amount"], sender_after["pending_transfers_count"]) == (100, 1)
    assert signals(conn, "account_update_signal") == []
    assert_lock_invariants(conn)


def test_negative_interest_reduces_what_can_be_locked(conn):
    # Edge case 36.
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=200, interest=-150.0)
    assert prepare(conn, recipient=0, max_locked=200)["locked_amount"] == 50


def test_interest_accrued_until_now_can_be_locked(conn):
    # Example 1 of spec 02 §3.10: 5100 at 10% for 365 days, 1000 locked -> 4609 available.
    insert_account(
        conn,
        DEBTOR_ID,
        SENDER_ID,
        principal=5000,
        interest=100.0,
        interest_rate=10.0,
        total_locked_amount=1000,
        last_change_ts=DEFAULT_NOW - 365 * DAY,
    )
    prepared = prepare(conn, recipient=0, min_locked=1, max_locked=MAX_INT64)
    assert prepared["locked_amount"] == 4609


def test_locked_amount_is_capped_by_max_locked_amount(conn, sender):
    assert prepare(conn, min_locked=1, max_locked=300)["locked_amount"] == 300
    assert account(conn, SENDER_ID)["total_locked_amount"] == 300


def test_min_locked_zero_is_prepared_even_when_nothing_is_available(conn):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=-5)
    prepared = prepare(conn, recipient=0, min_locked=0, max_locked=100)
    assert prepared["locked_amount"] == 0
    assert account(conn, SENDER_ID)["pending_transfers_count"] == 1


def test_earlier_requests_of_a_batch_consume_the_available_amount_in_arrival_order(conn):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100)
    for request_id in (1, 2, 3):
        enqueue_prepare(conn, recipient=0, min_locked=1, max_locked=60, request_id=request_id)
    assert process_prepares(conn) == 3
    prepared = signals(conn, "prepared_transfer_signal")
    assert [(row["coordinator_request_id"], row["locked_amount"]) for row in prepared] == [(1, 60), (2, 40)]
    # "Current total" includes the locks taken earlier in the same batch.
    assert rejections(conn) == [("INSUFFICIENT_AVAILABLE_AMOUNT", 100)]
    assert_lock_invariants(conn)


def test_existing_locks_reduce_the_available_amount(conn, sender):
    prepare(conn, min_locked=600, max_locked=600, request_id=1)
    prepare(conn, min_locked=401, max_locked=500, request_id=2)
    assert rejections(conn) == [("INSUFFICIENT_AVAILABLE_AMOUNT", 600)]
    assert prepare(conn, min_locked=400, max_locked=500, request_id=3)["locked_amount"] == 400
    assert_lock_invariants(conn)


# Batch: identifiers, deadlines, what is stored ------------------------------------------------


def test_transfer_ids_start_from_the_creation_day_shifted_by_40_bits(conn):
    # Example 7 of spec 02 §3.10: created 2024-05-20 (day 19863).
    created = dt.datetime(2024, 5, 20, 10, tzinfo=dt.UTC)
    insert_account(conn, DEBTOR_ID, SENDER_ID, now=created, principal=10)
    assert account(conn, SENDER_ID)["last_transfer_id"] == 21839599462514688
    first = prepare(conn, recipient=0, request_id=1, now=created)
    second = prepare(conn, recipient=0, request_id=2, now=created)
    assert (first["transfer_id"], second["transfer_id"]) == (21839599462514689, 21839599462514690)
    assert account(conn, SENDER_ID)["last_transfer_id"] == 21839599462514690


def test_transfer_ids_strictly_increase_and_rejections_consume_none(conn, sender):
    ids = []
    for request_id in range(1, 6):
        prepare(conn, min_locked=0, max_locked=1, request_id=request_id)
        prepare(conn, min_locked=10**6, max_locked=10**6, request_id=100 + request_id)
    ids = [row["transfer_id"] for row in signals(conn, "prepared_transfer_signal")]
    start = sender["last_transfer_id"]
    assert ids == list(range(start + 1, start + 6))


def test_deadline_is_the_commit_period_when_the_request_allows_longer(conn, sender):
    prepared = prepare(conn, max_locked=1, commit_period_seconds=30 * 86400, max_commit_delay_seconds=10**9)
    assert prepared["deadline"] == DEFAULT_NOW + 30 * DAY


def test_deadline_is_the_request_deadline_when_earlier_than_the_commit_period(conn, sender):
    ts = DEFAULT_NOW - dt.timedelta(minutes=10)
    prepared = prepare(conn, max_locked=1, ts=ts, max_commit_delay_seconds=3600)
    assert prepared["deadline"] == ts + dt.timedelta(hours=1)
    [transfer] = prepared_transfers(conn)
    assert transfer["deadline"] == prepared["deadline"]


def test_prepared_transfer_row_and_message_carry_the_same_values(conn, sender):
    later = DEFAULT_NOW + dt.timedelta(hours=3)
    prepared = prepare(conn, min_locked=5, max_locked=70, request_id=9, final_interest_rate_ts=T0, now=later)
    [transfer] = prepared_transfers(conn)
    assert transfer == {
        "debtor_id": DEBTOR_ID,
        "sender_creditor_id": SENDER_ID,
        "transfer_id": prepared["transfer_id"],
        "coordinator_type": "direct",
        "coordinator_id": SENDER_ID,
        "coordinator_request_id": 9,
        "recipient_creditor_id": RECIPIENT_ID,
        "prepared_at": later,
        "final_interest_rate_ts": T0,
        "demurrage_rate": -50.0,
        "deadline": later + dt.timedelta(seconds=COMMIT_PERIOD_SECONDS),
        "locked_amount": 70,
        "last_reminder_ts": None,
    }
    for column in transfer.keys() - {"last_reminder_ts"}:
        assert prepared[column] == transfer[column], column
    assert prepared["inserted_at"] == later


def test_preparation_changes_no_seqnum_and_sends_no_account_update(conn):
    before = insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000, pending_account_update=True)
    prepare(conn, recipient=0, max_locked=10, now=DEFAULT_NOW + DAY)
    after = account(conn, SENDER_ID)
    assert after["last_change_seqnum"] == before["last_change_seqnum"]
    assert after["last_change_ts"] == before["last_change_ts"]
    assert after["pending_account_update"] is True
    assert after["principal"] == 1000
    assert signals(conn, "account_update_signal") == []


def test_root_issuing_limit_bounds_what_the_root_can_lock(conn):
    # Example 6 of spec 02 §3.10.
    insert_account(conn, DEBTOR_ID, 0, negligible_amount=1e30, config_data='{"limit": 100}')
    prepare(
        conn,
        sender=0,
        reachable=True,
        coordinator_type="issuing",
        coordinator_id=DEBTOR_ID,
        min_locked=200,
        max_locked=200,
    )
    assert rejections(conn) == [("INSUFFICIENT_AVAILABLE_AMOUNT", 0)]


def test_root_negligible_amount_bounds_what_the_root_can_lock(conn):
    insert_account(conn, DEBTOR_ID, 0, negligible_amount=100.0)
    prepare(
        conn,
        sender=0,
        reachable=True,
        coordinator_type="issuing",
        coordinator_id=DEBTOR_ID,
        min_locked=200,
        max_locked=200,
    )
    assert rejections(conn) == [("INSUFFICIENT_AVAILABLE_AMOUNT", 0)]
    assert prepare(conn, sender=0, reachable=True, min_locked=100, max_locked=200, request_id=2)["locked_amount"] == 100


def test_root_with_huge_negligible_amount_and_no_limit_can_issue(conn):
    insert_account(conn, DEBTOR_ID, 0, negligible_amount=1e30)
    prepared = prepare(
        conn,
        sender=0,
        reachable=True,
        coordinator_type="issuing",
        coordinator_id=DEBTOR_ID,
        min_locked=200,
        max_locked=200,
    )
    assert prepared["locked_amount"] == 200


def test_available_amount_above_the_minimum_balance_is_contained(conn):
    # PL variant: floor(balance) - locks - min_balance is contained as a whole,
    # so a root with no limit can lock MAX_INT64 on top of a positive principal.
    insert_account(conn, DEBTOR_ID, 0, negligible_amount=1e30, principal=5)
    prepared = prepare(conn, sender=0, reachable=True, min_locked=MAX_INT64, max_locked=MAX_INT64)
    assert prepared["locked_amount"] == MAX_INT64
    assert account(conn, 0)["total_locked_amount"] == MAX_INT64


# Batch: queue handling ------------------------------------------------------------------------


def test_empty_queue_returns_zero_without_locking_the_sender(conn, sender, database_url):
    with psycopg.connect(database_url) as holder:
        holder.execute(
            "SELECT 1 FROM pyswpt.account WHERE debtor_id = %s AND creditor_id = %s FOR UPDATE",
            (DEBTOR_ID, SENDER_ID),
        )
        conn.execute("SET lock_timeout = '200ms'")
        assert process_prepares(conn) == 0
        holder.rollback()


def test_requests_of_other_senders_stay_queued(conn, sender):
    insert_account(conn, DEBTOR_ID, SENDER_ID + 1, principal=10)
    enqueue_prepare(conn, sender=SENDER_ID + 1, max_locked=1)
    enqueue_prepare(conn, max_locked=1)
    assert process_prepares(conn) == 1
    assert [request["sender_creditor_id"] for request in queued_requests(conn)] == [SENDER_ID + 1]


def test_a_batch_is_bounded_and_leaves_the_rest_queued(conn, sender):
    conn.execute(
        """
        SELECT enqueue_transfer_request(%s, %s, 'direct', %s, n, 0, 0, 0, %s, 60, %s, NULL, %s)
        FROM generate_series(1, 10001) AS n
        """,
        (DEBTOR_ID, SENDER_ID, SENDER_ID, DEFAULT_NOW, DEFAULT_NOW, DEFAULT_NOW),
    )
    assert process_prepares(conn) == 10000
    assert [request["coordinator_request_id"] for request in queued_requests(conn)] == [10001]
    assert process_prepares(conn) == 1
    assert value(conn, "SELECT count(*) FROM prepared_transfer") == 10001
    assert_lock_invariants(conn)


# Redelivery -------------------------------------------------------------------------------


def test_redelivered_request_in_one_batch_locks_once_and_answers_twice(conn):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100)
    for _ in range(2):
        enqueue_prepare(conn, recipient=RECIPIENT_ID, reachable=True, max_locked=60, request_id=7)
    process_prepares(conn)
    [transfer] = prepared_transfers(conn)
    answers = signals(conn, "prepared_transfer_signal")
    assert [a["transfer_id"] for a in answers] == [transfer["transfer_id"]] * 2
    assert [a["locked_amount"] for a in answers] == [60, 60]
    assert account(conn, SENDER_ID)["total_locked_amount"] == 60
    assert_lock_invariants(conn)


def test_request_redelivered_after_preparation_gets_the_same_prepared_transfer(conn):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100)
    first = prepare(conn, recipient=RECIPIENT_ID, reachable=True, max_locked=60, request_id=7)
    later = DEFAULT_NOW + DAY
    again = prepare(conn, recipient=RECIPIENT_ID, reachable=True, max_locked=60, request_id=7, now=later)
    assert again["transfer_id"] == first["transfer_id"]
    assert again["prepared_at"] == first["prepared_at"]
    assert again["inserted_at"] == later
    assert len(prepared_transfers(conn)) == 1
    assert_lock_invariants(conn)


def test_another_request_of_the_same_coordinator_is_prepared_again(conn):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100)
    first = prepare(conn, recipient=RECIPIENT_ID, reachable=True, max_locked=10, request_id=7)
    second = prepare(conn, recipient=RECIPIENT_ID, reachable=True, max_locked=10, request_id=8)
    assert second["transfer_id"] == first["transfer_id"] + 1
    assert account(conn, SENDER_ID)["total_locked_amount"] == 20
