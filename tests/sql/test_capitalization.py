"""Interest capitalization (spec 02 §2.9; §3.10 example 2; §6 edge cases 19-21)."""

from __future__ import annotations

import pytest
from balance_steps import DAY, account, deliver_pending_balance_changes, signals, value
from factories import DEFAULT_NOW, STATUS_DELETED, T0, insert_account

NOW = DEFAULT_NOW
DEBTOR_ID = 1
CREDITOR_ID = 1
MIN_INTERVAL_SECONDS = 14 * 86400


def capitalize(conn, creditor_id=CREDITOR_ID, *, now=NOW, min_interval_seconds=MIN_INTERVAL_SECONDS):
    return value(
        conn,
        "SELECT capitalize_interest(%s, %s, %s, %s)",
        (DEBTOR_ID, creditor_id, min_interval_seconds, now),
    )


def insert_example_1_account(conn, rate, **overrides):
    """Principal 5000, interest 100, unchanged for 365 days (spec 02 §3.10 example 1)."""
    insert_account(
        conn,
        DEBTOR_ID,
        CREDITOR_ID,
        now=NOW - 365 * DAY,
        principal=5000,
        interest=100.0,
        interest_rate=rate,
        **overrides,
    )


def test_example_2_positive_accrual_is_floored_into_principal(conn):
    insert_example_1_account(conn, 10.0)
    assert capitalize(conn) == 609
    capitalized = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert capitalized["principal"] == 5609
    assert capitalized["interest"] == pytest.approx(0.6340365034302522, abs=1e-6)
    assert capitalized["last_interest_capitalization_ts"] == NOW


def test_example_2_root_is_charged_by_a_pending_change(conn):
    insert_example_1_account(conn, 10.0)
    capitalize(conn)
    [change] = signals(conn, "pending_balance_change_signal")
    assert (change["creditor_id"], change["other_creditor_id"], change["principal_delta"]) == (0, CREDITOR_ID, -609)
    assert (change["coordinator_type"], change["transfer_note_format"], change["transfer_note"]) == ("interest", "", "")
    assert change["committed_at"] == NOW


def test_example_2_capitalization_is_reported_as_a_transfer_from_root(conn):
    insert_example_1_account(conn, 10.0)
    capitalize(conn)
    [transfer] = signals(conn, "account_transfer_signal")
    assert (transfer["acquired_amount"], transfer["principal"], transfer["other_creditor_id"]) == (609, 5609, 0)
    assert (transfer["coordinator_type"], transfer["committed_at"]) == ("interest", NOW)


def test_example_2_negative_accrual_is_floored_too(conn):
    insert_example_1_account(conn, -10.0)
    assert capitalize(conn) == -410
    capitalized = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert capitalized["principal"] == 4590
    assert capitalized["interest"] == pytest.approx(0.3310213586244686, abs=1e-6)
    assert [t["acquired_amount"] for t in signals(conn, "account_transfer_signal")] == [-410]


def test_edge_20_capitalization_leaves_at_most_one_unit_of_interest(conn):
    insert_example_1_account(conn, 10.0)
    capitalize(conn)
    capitalized = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert 5608 <= capitalized["principal"] <= 5612
    assert abs(capitalized["interest"]) <= 1


def test_negligible_capitalization_changes_principal_without_transfer(conn):
    insert_example_1_account(conn, 10.0, negligible_amount=1000.0)
    capitalize(conn)
    assert signals(conn, "account_transfer_signal") == []
    assert account(conn, DEBTOR_ID, CREDITOR_ID)["principal"] == 5609


def test_capitalization_is_announced_by_the_scanner_not_at_once(conn):
    insert_example_1_account(conn, 10.0, last_change_seqnum=3)
    capitalize(conn)
    assert signals(conn, "account_update_signal") == []
    capitalized = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (capitalized["pending_account_update"], capitalized["last_change_seqnum"]) == (True, 4)


def test_edge_21_capitalizing_a_root_account_changes_nothing(conn):
    insert_account(conn, DEBTOR_ID, 0, now=NOW - 365 * DAY, principal=50, interest=100.0, interest_rate=10.0)
    assert capitalize(conn, 0) == 0
    root = account(conn, DEBTOR_ID, 0)
    assert (root["principal"], root["interest"], root["last_interest_capitalization_ts"]) == (50, 100.0, T0)
    assert signals(conn, "pending_balance_change_signal") == []


def test_capitalization_waits_for_the_minimum_interval(conn):
    insert_example_1_account(conn, 10.0, last_interest_capitalization_ts=NOW - 13 * DAY)
    assert capitalize(conn) == 0
    assert account(conn, DEBTOR_ID, CREDITOR_ID)["principal"] == 5000


def test_capitalization_is_allowed_once_the_interval_has_passed(conn):
    insert_example_1_account(conn, 10.0, last_interest_capitalization_ts=NOW - 14 * DAY)
    assert capitalize(conn) == 609


def test_direct_call_may_pass_a_zero_interval(conn):
    insert_example_1_account(conn, 10.0, last_interest_capitalization_ts=NOW)
    assert capitalize(conn, min_interval_seconds=0) == 609


def test_nothing_accrued_changes_nothing_not_even_the_timestamp(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=NOW - DAY, principal=1000, interest=0.5)
    assert capitalize(conn) == 0
    unchanged = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (unchanged["last_interest_capitalization_ts"], unchanged["last_change_seqnum"]) == (T0, 0)


def test_deleted_or_missing_account_is_not_capitalized(conn):
    insert_example_1_account(conn, 10.0, status_flags=STATUS_DELETED)
    assert capitalize(conn) == 0
    assert capitalize(conn, CREDITOR_ID + 1) == 0
    assert account(conn, DEBTOR_ID, CREDITOR_ID)["principal"] == 5000


def test_capitalization_conserves_money_once_root_is_charged(conn):
    insert_example_1_account(conn, 10.0)
    insert_account(conn, DEBTOR_ID, 0, principal=-5000)
    capitalize(conn)
    deliver_pending_balance_changes(conn)
    assert value(conn, "SELECT sum(principal) FROM account WHERE debtor_id = %s", (DEBTOR_ID,)) == 0
