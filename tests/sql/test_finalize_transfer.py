"""FinalizeTransfer: the status code, intake and the per-sender batch
(spec 02 §2.5, §3.5, §3.10 examples 4-5, §6 edge cases 37-46)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from factories import DEFAULT_NOW, STATUS_DELETED, insert_account
from transfer_steps import (  # noqa: F401 - recipient and transfer_invariants_hold are fixtures
    DAY,
    DEBTOR_ID,
    MAX_INT64,
    RECIPIENT_ID,
    SENDER_ID,
    WHOLE_REALM,
    account,
    deliver_balance_changes,
    enqueue_finalize,
    enqueue_prepare,
    finalize,
    held_by_another_transaction,
    prepare,
    prepared_transfers,
    process_finalizations,
    process_prepares,
    recipient,
    rows,
    signals,
    transfer_invariants_hold,
)

from pyswpt.sharding import Realm, shard_key

pytestmark = pytest.mark.usefixtures("transfer_invariants_hold")

SECOND = dt.timedelta(seconds=1)
FAR_DEADLINE = DEFAULT_NOW + 1000 * DAY


def status(
    conn: psycopg.Connection,
    committed: int,
    expendable: int,
    *,
    locked: int = 1000,
    now: dt.datetime = DEFAULT_NOW,
    deadline: dt.datetime = FAR_DEADLINE,
    final_interest_rate_ts: dt.datetime = DEFAULT_NOW,
    rate_change_ts: dt.datetime = DEFAULT_NOW,
    sender: int = SENDER_ID,
) -> str:
    """calc_finalization_status of a transfer prepared at DEFAULT_NOW with demurrage -50."""
    return conn.execute(
        "SELECT calc_finalization_status(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            committed,
            expendable,
            locked,
            DEFAULT_NOW,
            deadline,
            final_interest_rate_ts,
            -50.0,
            sender,
            rate_change_ts,
            now,
        ),
    ).fetchone()[0]


def prepared_with(conn: psycopg.Connection, principal: int, locked: int, **request: Any) -> dict[str, Any]:
    """A sender with `principal`, one transfer to RECIPIENT_ID locking `locked`."""
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=principal)
    transfer = prepare(conn, min_locked=locked, max_locked=locked, reachable=True, **request)
    assert transfer is not None and transfer["locked_amount"] == locked
    return transfer


# The status code (spec 02 §2.5 "Status code") ------------------------------------------------

STATUS_TABLE = [
    # edge case 45 (lock 1000, prepared at DEFAULT_NOW, final_interest_rate_ts = prepared_at)
    (
        "rate changed one minute later",
        dict(committed=1000, expendable=0, rate_change_ts=DEFAULT_NOW + dt.timedelta(minutes=1)),
        "NEWER_INTEREST_RATE",
    ),
    ("rate changed at the same instant", dict(committed=1000, expendable=0), "OK"),
    ("20000 days later", dict(committed=1000, expendable=0, now=DEFAULT_NOW + 20000 * DAY), "TIMEOUT"),
    ("10 days before preparation", dict(committed=1000, expendable=-50000, now=DEFAULT_NOW - 10 * DAY), "OK"),
    ("10 days later, within the demurrage", dict(committed=980, expendable=-50000, now=DEFAULT_NOW + 10 * DAY), "OK"),
    ("E = -1 at the same instant", dict(committed=1000, expendable=-1), "OK"),
    (
        "E = -1 one second later",
        dict(committed=1000, expendable=-1, now=DEFAULT_NOW + SECOND),
        "INSUFFICIENT_AVAILABLE_AMOUNT",
    ),
    # example 4 (10 days after preparation: factor 0.98120160, reserved path up to 981)
    (
        "999 with E = -5",
        dict(committed=999, expendable=-5, now=DEFAULT_NOW + 10 * DAY),
        "INSUFFICIENT_AVAILABLE_AMOUNT",
    ),
    ("995 with E = -5", dict(committed=995, expendable=-5, now=DEFAULT_NOW + 10 * DAY), "OK"),
    (
        "995 with E = -50000",
        dict(committed=995, expendable=-50000, now=DEFAULT_NOW + 10 * DAY),
        "INSUFFICIENT_AVAILABLE_AMOUNT",
    ),
    ("981 with E = -50000", dict(committed=981, expendable=-50000, now=DEFAULT_NOW + 10 * DAY), "OK"),
    (
        "982 with E = -50000",
        dict(committed=982, expendable=-50000, now=DEFAULT_NOW + 10 * DAY),
        "INSUFFICIENT_AVAILABLE_AMOUNT",
    ),
    (
        "1000 with E = -50000, normal sender",
        dict(committed=1000, expendable=-50000, now=DEFAULT_NOW + 10 * DAY),
        "INSUFFICIENT_AVAILABLE_AMOUNT",
    ),
    (
        "1000 with E = -50000, root sender",
        dict(committed=1000, expendable=-50000, now=DEFAULT_NOW + 10 * DAY, sender=0),
        "OK",
    ),
    ("1000 with E = 0, expendable path", dict(committed=1000, expendable=0, now=DEFAULT_NOW + 10 * DAY), "OK"),
    ("1001 with E = 0, root sender", dict(committed=1001, expendable=0, sender=0), "INSUFFICIENT_AVAILABLE_AMOUNT"),
    # demurrage after 30 days (0.94465830) and 90 days (0.84299351)
    ("944 after 30 days", dict(committed=944, expendable=-50000, now=DEFAULT_NOW + 30 * DAY), "OK"),
    (
        "945 after 30 days",
        dict(committed=945, expendable=-50000, now=DEFAULT_NOW + 30 * DAY),
        "INSUFFICIENT_AVAILABLE_AMOUNT",
    ),
    ("842 after 90 days", dict(committed=842, expendable=-50000, now=DEFAULT_NOW + 90 * DAY), "OK"),
    (
        "843 after 90 days",
        dict(committed=843, expendable=-50000, now=DEFAULT_NOW + 90 * DAY),
        "INSUFFICIENT_AVAILABLE_AMOUNT",
    ),
    # the order of the rules
    ("dismissal after the deadline", dict(committed=0, expendable=-50000, now=FAR_DEADLINE + DAY), "OK"),
    ("dismissal under a newer rate", dict(committed=0, expendable=0, rate_change_ts=DEFAULT_NOW + DAY), "OK"),
    ("at the deadline", dict(committed=1000, expendable=0, now=FAR_DEADLINE), "OK"),
    (
        "one microsecond after the deadline",
        dict(committed=1000, expendable=0, now=FAR_DEADLINE + dt.timedelta(microseconds=1)),
        "TIMEOUT",
    ),
    (
        "timeout before newer rate",
        dict(committed=1, expendable=0, now=FAR_DEADLINE + DAY, rate_change_ts=DEFAULT_NOW + DAY),
        "TIMEOUT",
    ),
    (
        "newer rate before insufficient",
        dict(committed=10**6, expendable=0, rate_change_ts=DEFAULT_NOW + DAY),
        "NEWER_INTEREST_RATE",
    ),
    ("huge commit", dict(committed=MAX_INT64, expendable=0), "INSUFFICIENT_AVAILABLE_AMOUNT"),
    # exact arithmetic above 2^63 and an exp() that would underflow
    ("expendable above 2^63", dict(committed=MAX_INT64, expendable=MAX_INT64), "OK"),
    (
        "8000 years of demurrage",
        dict(
            committed=1,
            expendable=-50000,
            deadline=dt.datetime(9999, 12, 31, tzinfo=dt.UTC),
            now=dt.datetime(9999, 1, 1, tzinfo=dt.UTC),
        ),
        "INSUFFICIENT_AVAILABLE_AMOUNT",
    ),
]


@pytest.mark.parametrize(("case", "arguments", "expected"), STATUS_TABLE, ids=[case for case, _, _ in STATUS_TABLE])
def test_status_code_follows_the_spec_table(conn, case, arguments, expected):
    assert status(conn, **arguments) == expected


# Intake ---------------------------------------------------------------------------------------


def test_second_request_for_one_transfer_is_dropped_at_intake(conn, recipient):
    # Edge case 46.
    transfer = prepared_with(conn, 100, 100)
    assert enqueue_finalize(conn, transfer, 40) is True
    assert enqueue_finalize(conn, transfer, 50) is False
    [request] = rows(conn, "SELECT * FROM finalization_request")
    assert request["committed_amount"] == 40


def test_intake_stores_the_request_fields(conn, recipient):
    transfer = prepared_with(conn, 100, 100)
    ts = DEFAULT_NOW - dt.timedelta(minutes=3)
    enqueue_finalize(conn, transfer, 40, note_format="json", note='{"a": 1}', ts=ts)
    [request] = rows(conn, "SELECT * FROM finalization_request")
    # When it was queued: the transaction's time, set by the column's default.
    assert request.pop("enqueued_at") is not None
    assert request == {
        "debtor_id": DEBTOR_ID,
        "sender_creditor_id": SENDER_ID,
        "transfer_id": transfer["transfer_id"],
        "coordinator_type": "direct",
        "coordinator_id": SENDER_ID,
        "coordinator_request_id": 1,
        "committed_amount": 40,
        "transfer_note_format": "json",
        "transfer_note": '{"a": 1}',
        "ts": ts,
    }


# Batch ----------------------------------------------------------------------------------------


def test_dismissal_releases_the_lock_and_moves_nothing(conn, recipient):
    # Edge case 37.
    transfer = prepared_with(conn, 100, 100)
    before = account(conn, SENDER_ID)
    finalized = finalize(conn, transfer, 0, now=DEFAULT_NOW + DAY)
    assert (finalized["status_code"], finalized["committed_amount"], finalized["total_locked_amount"]) == ("OK", 0, 0)
    after = account(conn, SENDER_ID)
    assert (after["principal"], after["total_locked_amount"], after["pending_transfers_count"]) == (100, 0, 0)
    assert after["last_change_seqnum"] == before["last_change_seqnum"]
    assert signals(conn, "account_transfer_signal") == []
    assert signals(conn, "pending_balance_change_signal") == []
    assert prepared_transfers(conn) == []


def test_dismissal_after_the_deadline_is_ok(conn, recipient):
    transfer = prepared_with(conn, 100, 100, commit_period_seconds=86400)
    finalized = finalize(conn, transfer, 0, now=DEFAULT_NOW + 30 * DAY)
    assert (finalized["status_code"], finalized["committed_amount"]) == ("OK", 0)


def test_commit_debits_the_sender_now_and_credits_the_recipient_by_message(conn, recipient):
    # Edge case 38 (sender side).
    transfer = prepared_with(conn, 100, 100)
    later = DEFAULT_NOW + dt.timedelta(hours=2)
    finalized = finalize(conn, transfer, 40, note_format="text", note="rent", now=later)
    assert finalized == {
        "debtor_id": DEBTOR_ID,
        "sender_creditor_id": SENDER_ID,
        "transfer_id": transfer["transfer_id"],
        "coordinator_type": "direct",
        "coordinator_id": SENDER_ID,
        "coordinator_request_id": 1,
        "prepared_at": DEFAULT_NOW,
        "finalized_at": later,
        "committed_amount": 40,
        "total_locked_amount": 0,
        "status_code": "OK",
        "inserted_at": later,
        "flushed_at_commit": True,  # a synchronous commit wrote it
    }
    sender = account(conn, SENDER_ID)
    assert (sender["principal"], sender["interest"], sender["total_locked_amount"]) == (60, 0.0, 0)
    [sent] = signals(conn, "account_transfer_signal")
    assert (sent["creditor_id"], sent["acquired_amount"], sent["other_creditor_id"], sent["principal"]) == (
        SENDER_ID,
        -40,
        RECIPIENT_ID,
        60,
    )
    assert (sent["transfer_note_format"], sent["transfer_note"], sent["committed_at"]) == ("text", "rent", later)
    [change] = signals(conn, "pending_balance_change_signal")
    assert (change["other_creditor_id"], change["creditor_id"], change["principal_delta"]) == (
        SENDER_ID,
        RECIPIENT_ID,
        40,
    )
    assert (change["coordinator_type"], change["transfer_note_format"], change["transfer_note"]) == (
        "direct",
        "text",
        "rent",
    )
    assert change["committed_at"] == later


def test_commit_to_a_busy_recipient_in_the_workers_realm_is_queued_without_a_message(conn, database_url, recipient):
    # A free one is credited at once (tests/sql/test_credit_at_once.py).
    transfer = prepared_with(conn, 100, 100)
    later = DEFAULT_NOW + dt.timedelta(hours=2)
    enqueue_finalize(conn, transfer, 40, note_format="text", note="rent", now=later)
    with held_by_another_transaction(conn, database_url, RECIPIENT_ID):
        process_finalizations(conn, now=later, realm=WHOLE_REALM)
    assert signals(conn, "pending_balance_change_signal") == []
    [queued] = rows(conn, "SELECT * FROM pending_balance_change")
    assert {key: queued[key] for key in ("other_creditor_id", "creditor_id", "principal_delta", "committed_at")} == {
        "other_creditor_id": SENDER_ID,
        "creditor_id": RECIPIENT_ID,
        "principal_delta": 40,
        "committed_at": later,
    }
    assert (queued["coordinator_type"], queued["transfer_note_format"], queued["transfer_note"]) == (
        "direct",
        "text",
        "rent",
    )
    [archived] = rows(conn, "SELECT * FROM registered_balance_change")
    assert (archived["change_id"], archived["is_applied"]) == (queued["change_id"], False)

    conn.execute("SELECT process_balance_changes(%s, %s, %s)", (DEBTOR_ID, RECIPIENT_ID, later))
    assert account(conn, RECIPIENT_ID)["principal"] == 40
    [received] = [row for row in signals(conn, "account_transfer_signal") if row["creditor_id"] == RECIPIENT_ID]
    assert (received["acquired_amount"], received["other_creditor_id"], received["committed_at"]) == (
        40,
        SENDER_ID,
        later,
    )


def test_commit_to_a_recipient_outside_the_workers_realm_goes_through_the_outbox(conn, recipient):
    transfer = prepared_with(conn, 100, 100)
    recipients_half = shard_key(DEBTOR_ID, RECIPIENT_ID) >> 31
    other_half = Realm.from_binding_key(f"{1 - recipients_half}.#")
    enqueue_finalize(conn, transfer, 40)
    process_finalizations(conn, realm=other_half)
    [change] = signals(conn, "pending_balance_change_signal")
    assert (change["creditor_id"], change["principal_delta"]) == (RECIPIENT_ID, 40)
    assert rows(conn, "SELECT * FROM pending_balance_change") == []


def test_change_ids_stay_unique_whichever_way_a_change_travels(conn, database_url, recipient):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100)
    for request_id in (1, 2):
        enqueue_prepare(conn, min_locked=10, max_locked=10, request_id=request_id)
    process_prepares(conn)
    through_the_outbox, queued_at_once = signals(conn, "prepared_transfer_signal")
    enqueue_finalize(conn, through_the_outbox, 10)
    process_finalizations(conn)
    enqueue_finalize(conn, queued_at_once, 10)
    with held_by_another_transaction(conn, database_url, RECIPIENT_ID):
        process_finalizations(conn, realm=WHOLE_REALM)
    [sent] = signals(conn, "pending_balance_change_signal")
    [queued] = rows(conn, "SELECT * FROM pending_balance_change")
    assert sent["change_id"] != queued["change_id"]
    deliver_balance_changes(conn)
    assert account(conn, RECIPIENT_ID)["principal"] == 20


def test_committed_amount_reaches_the_recipient(conn, recipient):
    # Edge case 38 (recipient side, through the balance-change processor).
    transfer = prepared_with(conn, 100, 100)
    finalize(conn, transfer, 40)
    deliver_balance_changes(conn)
    received = account(conn, RECIPIENT_ID)
    assert (received["principal"], received["interest"]) == (40, 0.0)
    incoming = [row for row in signals(conn, "account_transfer_signal") if row["creditor_id"] == RECIPIENT_ID]
    assert [(row["acquired_amount"], row["other_creditor_id"], row["principal"]) for row in incoming] == [
        (40, SENDER_ID, 40)
    ]


def test_commit_marks_the_sender_changed_without_an_account_update(conn, recipient):
    transfer = prepared_with(conn, 100, 100)
    before = account(conn, SENDER_ID)
    finalize(conn, transfer, 40, now=DEFAULT_NOW + DAY)
    after = account(conn, SENDER_ID)
    assert after["last_change_seqnum"] == before["last_change_seqnum"] + 1
    assert after["last_change_ts"] == DEFAULT_NOW + DAY
    assert after["pending_account_update"] is True
    assert signals(conn, "account_update_signal") == []


def test_root_issues_money_within_its_lock(conn, recipient):
    # Edge case 39.
    insert_account(conn, DEBTOR_ID, 0, negligible_amount=1e30)
    transfer = prepare(
        conn, sender=0, coordinator_type="issuing", coordinator_id=DEBTOR_ID, min_locked=200, max_locked=200
    )
    finalized = finalize(conn, transfer, 200)
    assert (finalized["status_code"], finalized["committed_amount"]) == ("OK", 200)
    assert account(conn, 0)["principal"] == -200
    assert signals(conn, "account_transfer_signal") == []  # the root numbers nothing
    deliver_balance_changes(conn)
    assert account(conn, RECIPIENT_ID)["principal"] == 200


@pytest.mark.parametrize(("committed", "expected"), [(100, "OK"), (101, "INSUFFICIENT_AVAILABLE_AMOUNT")])
def test_root_commit_above_its_lock_is_bounded_by_its_minimum_balance(conn, recipient, committed, expected):
    # The expendable amount counts down to B7's minimum balance: -min(limit 100, negligible 1e30).
    insert_account(conn, DEBTOR_ID, 0, negligible_amount=1e30, config_data='{"limit": 100}')
    transfer = prepare(conn, sender=0, coordinator_type="issuing", coordinator_id=DEBTOR_ID, min_locked=0, max_locked=0)
    assert finalize(conn, transfer, committed)["status_code"] == expected


def test_zero_lock_commit_without_balance_is_insufficient_and_moves_nothing(conn, recipient):
    # Edge case 40.
    transfer = prepared_with(conn, 0, 0)
    finalized = finalize(conn, transfer, 40)
    assert (finalized["status_code"], finalized["committed_amount"]) == ("INSUFFICIENT_AVAILABLE_AMOUNT", 0)
    assert account(conn, SENDER_ID)["principal"] == 0
    assert signals(conn, "account_transfer_signal") == []
    assert signals(conn, "pending_balance_change_signal") == []


def test_zero_lock_commit_succeeds_when_the_balance_grew_after_preparation(conn, recipient):
    # Edge case 40.
    transfer = prepared_with(conn, 0, 0)
    conn.execute("UPDATE account SET principal = 100 WHERE creditor_id = %s", (SENDER_ID,))
    finalized = finalize(conn, transfer, 40)
    assert (finalized["status_code"], finalized["committed_amount"]) == ("OK", 40)
    assert account(conn, SENDER_ID)["principal"] == 60


def test_commit_after_the_deadline_finalizes_with_timeout(conn, recipient):
    # Edge case 41: prepared 100 days ago with a 30-day commit period.
    transfer = prepared_with(conn, 100, 100, commit_period_seconds=30 * 86400)
    finalized = finalize(conn, transfer, 40, now=DEFAULT_NOW + 100 * DAY)
    assert (finalized["status_code"], finalized["committed_amount"], finalized["total_locked_amount"]) == (
        "TIMEOUT",
        0,
        0,
    )
    assert account(conn, SENDER_ID)["principal"] == 100


def test_commit_far_above_the_lock_is_insufficient(conn, recipient):
    # Edge case 42.
    transfer = prepared_with(conn, 100, 100)
    finalized = finalize(conn, transfer, 40000)
    assert (finalized["status_code"], finalized["committed_amount"]) == ("INSUFFICIENT_AVAILABLE_AMOUNT", 0)


def test_commit_to_the_root_reports_only_the_sender_side(conn):
    # Edge case 43.
    transfer = prepared_with(conn, 100, 100, recipient=0)
    finalize(conn, transfer, 40)
    deliver_balance_changes(conn)
    assert [(row["creditor_id"], row["acquired_amount"]) for row in signals(conn, "account_transfer_signal")] == [
        (SENDER_ID, -40)
    ]
    assert account(conn, 0)["principal"] == 40


def test_full_lock_commit_is_ok_within_the_commit_period_and_not_after(conn, recipient):
    # Edge case 44: 30-day commit period; the first commit is checked in a rolled-back transaction.
    transfer = prepared_with(conn, 1000, 1000, commit_period_seconds=30 * 86400)
    with conn.transaction(force_rollback=True):
        assert finalize(conn, transfer, 1000)["status_code"] == "OK"
    with conn.transaction(force_rollback=True):
        assert finalize(conn, transfer, 10**12)["status_code"] == "INSUFFICIENT_AVAILABLE_AMOUNT"
    assert finalize(conn, transfer, 1000, now=DEFAULT_NOW + 31 * DAY)["status_code"] == "TIMEOUT"


def test_newer_interest_rate_at_commit_finalizes_without_moving(conn, recipient):
    transfer = prepared_with(conn, 100, 100)
    conn.execute(
        "UPDATE account SET last_interest_rate_change_ts = %s WHERE creditor_id = %s",
        (DEFAULT_NOW + DAY, SENDER_ID),
    )
    finalized = finalize(conn, transfer, 40, now=DEFAULT_NOW + 2 * DAY)
    assert (finalized["status_code"], finalized["committed_amount"]) == ("NEWER_INTEREST_RATE", 0)
    assert account(conn, SENDER_ID)["principal"] == 100


@pytest.mark.parametrize(
    ("days", "largest_ok"),
    [(10, 981), (30, 944), (90, 842)],
)
def test_a_lock_loses_value_to_demurrage_when_nothing_else_is_expendable(conn, recipient, days, largest_ok):
    # Example 4 in a real batch: the sender lost its whole balance after preparation.
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)
    first = prepare(conn, min_locked=1000, max_locked=1000, request_id=1)
    conn.execute("UPDATE account SET principal = 1000 + 1000 WHERE creditor_id = %s", (SENDER_ID,))
    second = prepare(conn, min_locked=1000, max_locked=1000, request_id=2)
    conn.execute("UPDATE account SET principal = 0 WHERE creditor_id = %s", (SENDER_ID,))
    now = DEFAULT_NOW + days * DAY
    assert finalize(conn, first, largest_ok + 1, now=now)["status_code"] == "INSUFFICIENT_AVAILABLE_AMOUNT"
    assert finalize(conn, second, largest_ok, now=now)["status_code"] == "OK"
    assert account(conn, SENDER_ID)["principal"] == -largest_ok


def test_expendable_amount_includes_interest_accrued_until_now(conn, recipient):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000, interest_rate=10.0)
    transfer = prepare(conn, min_locked=1000, max_locked=1000, commit_period_seconds=400 * 86400)
    # After 365.25 days at 10% the balance is 1100 (to rounding): E is about 100.
    year_later = DEFAULT_NOW + dt.timedelta(seconds=31_557_600)
    finalized = finalize(conn, transfer, 1050, now=year_later)
    assert (finalized["status_code"], finalized["committed_amount"]) == ("OK", 1050)
    sender = account(conn, SENDER_ID)
    assert sender["principal"] == -50
    # B2 folded the accrued interest into the interest column.
    assert sender["interest"] == pytest.approx(100.0, abs=1e-6)


def test_two_commits_in_one_batch_report_the_starting_principal_minus_each_amount(conn, recipient):
    # Example 5 of spec 02 §3.10.
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100)
    enqueue_prepare(conn, min_locked=1, max_locked=60, request_id=1)
    enqueue_prepare(conn, min_locked=1, max_locked=60, request_id=2)
    process_prepares(conn)
    first, second = signals(conn, "prepared_transfer_signal")
    assert (first["locked_amount"], second["locked_amount"]) == (60, 40)
    before = account(conn, SENDER_ID)
    enqueue_finalize(conn, first, 60)
    enqueue_finalize(conn, second, 30)
    assert process_finalizations(conn) == 2

    finalized = signals(conn, "finalized_transfer_signal")
    assert [(row["status_code"], row["committed_amount"], row["total_locked_amount"]) for row in finalized] == [
        ("OK", 60, 40),
        ("OK", 30, 0),
    ]
    sent = signals(conn, "account_transfer_signal")
    assert [(row["transfer_number"], row["acquired_amount"], row["principal"]) for row in sent] == [
        (1, -60, 40),
        (2, -30, 70),  # quirk: the running principal would be 10
    ]
    sender = account(conn, SENDER_ID)
    assert (sender["principal"], sender["last_change_seqnum"], sender["pending_account_update"]) == (
        10,
        before["last_change_seqnum"] + 1,
        True,
    )
    assert [row["principal_delta"] for row in signals(conn, "pending_balance_change_signal")] == [60, 30]
    deliver_balance_changes(conn)
    received = [
        row["principal"] for row in signals(conn, "account_transfer_signal") if row["creditor_id"] == RECIPIENT_ID
    ]
    assert received == [60, 90]


def test_second_commit_beyond_what_is_left_is_insufficient_but_releases_its_lock(conn, recipient):
    # Example 5, variant: the second commit is 50.
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100)
    enqueue_prepare(conn, min_locked=1, max_locked=60, request_id=1)
    enqueue_prepare(conn, min_locked=1, max_locked=60, request_id=2)
    process_prepares(conn)
    first, second = signals(conn, "prepared_transfer_signal")
    enqueue_finalize(conn, first, 60)
    enqueue_finalize(conn, second, 50)
    process_finalizations(conn)
    finalized = signals(conn, "finalized_transfer_signal")
    assert [(row["status_code"], row["committed_amount"], row["total_locked_amount"]) for row in finalized] == [
        ("OK", 60, 40),
        ("INSUFFICIENT_AVAILABLE_AMOUNT", 0, 0),
    ]
    assert account(conn, SENDER_ID)["principal"] == 40


def test_outgoing_transfer_is_reported_even_below_the_negligible_amount(conn, recipient):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=100, negligible_amount=1000.0)
    transfer = prepare(conn, min_locked=100, max_locked=100)
    finalize(conn, transfer, 40)
    assert [row["acquired_amount"] for row in signals(conn, "account_transfer_signal")] == [-40]


def test_redelivered_finalization_has_one_effect(conn, recipient):
    transfer = prepared_with(conn, 100, 100)
    finalize(conn, transfer, 40)
    assert enqueue_finalize(conn, transfer, 40) is True
    assert process_finalizations(conn) == 1
    assert len(signals(conn, "finalized_transfer_signal")) == 1
    assert len(signals(conn, "pending_balance_change_signal")) == 1
    assert account(conn, SENDER_ID)["principal"] == 60
    assert rows(conn, "SELECT * FROM finalization_request") == []


@pytest.mark.parametrize(
    "mismatch",
    [{"coordinator_type": "agent"}, {"coordinator_id": 7}, {"coordinator_request_id": 2}],
    ids=["coordinator_type", "coordinator_id", "coordinator_request_id"],
)
def test_request_not_matching_all_six_fields_is_discarded_silently(conn, recipient, mismatch):
    transfer = prepared_with(conn, 100, 100)
    enqueue_finalize(conn, transfer, 40, **mismatch)
    assert process_finalizations(conn) == 1
    assert signals(conn, "finalized_transfer_signal") == []
    assert rows(conn, "SELECT * FROM finalization_request") == []
    assert len(prepared_transfers(conn)) == 1
    assert account(conn, SENDER_ID)["total_locked_amount"] == 100


def test_request_for_an_unknown_transfer_id_is_discarded_silently(conn, recipient):
    transfer = prepared_with(conn, 100, 100)
    enqueue_finalize(conn, {**transfer, "transfer_id": transfer["transfer_id"] + 1}, 40)
    assert process_finalizations(conn) == 1
    assert signals(conn, "finalized_transfer_signal") == []
    assert len(prepared_transfers(conn)) == 1


def test_queued_wrong_request_hides_a_right_one_until_processed(conn, recipient):
    transfer = prepared_with(conn, 100, 100)
    assert enqueue_finalize(conn, transfer, 40, coordinator_request_id=99) is True
    assert enqueue_finalize(conn, transfer, 40) is False
    process_finalizations(conn)
    assert signals(conn, "finalized_transfer_signal") == []
    # The coordinator's retry after the next reminder gets through.
    assert finalize(conn, transfer, 40)["status_code"] == "OK"


def test_ignore_all_deletes_the_requests_without_finalizing(conn, recipient):
    # Parent-shard cleanup (spec 01 §4.3, edge case 48).
    transfer = prepared_with(conn, 100, 100)
    enqueue_finalize(conn, transfer, 40)
    assert process_finalizations(conn, ignore_all=True) == 1
    assert rows(conn, "SELECT * FROM finalization_request") == []
    assert signals(conn, "finalized_transfer_signal") == []
    assert len(prepared_transfers(conn)) == 1


def test_requests_of_a_deleted_sender_are_deleted_without_messages(conn, recipient):
    transfer = prepared_with(conn, 100, 100)
    conn.execute(
        "UPDATE account SET status_flags = %s, total_locked_amount = 0, pending_transfers_count = 0"
        " WHERE creditor_id = %s",
        (STATUS_DELETED, SENDER_ID),
    )
    conn.execute("DELETE FROM prepared_transfer")
    enqueue_finalize(conn, transfer, 40)
    assert process_finalizations(conn) == 1
    assert rows(conn, "SELECT * FROM finalization_request") == []
    assert signals(conn, "finalized_transfer_signal") == []


def test_empty_queue_returns_zero(conn, recipient):
    prepared_with(conn, 100, 100)
    assert process_finalizations(conn) == 0


def test_several_transfers_finalize_in_one_batch_with_running_totals(conn, recipient):
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)
    for request_id in range(1, 6):
        enqueue_prepare(conn, min_locked=100, max_locked=100, request_id=request_id)
    process_prepares(conn)
    transfers = signals(conn, "prepared_transfer_signal")
    for transfer, amount in zip(transfers, (0, 100, 50, 100, 0), strict=True):
        enqueue_finalize(conn, transfer, amount)
    assert process_finalizations(conn) == 5
    finalized = signals(conn, "finalized_transfer_signal")
    assert [row["total_locked_amount"] for row in finalized] == [400, 300, 200, 100, 0]
    assert [row["committed_amount"] for row in finalized] == [0, 100, 50, 100, 0]
    sender = account(conn, SENDER_ID)
    assert (sender["principal"], sender["pending_transfers_count"]) == (750, 0)
    assert [row["principal"] for row in signals(conn, "account_transfer_signal")] == [900, 950, 900]
