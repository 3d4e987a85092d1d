"""Deletion attempts and resurrection (spec 02 §2.10, B4, B5; §6 edge cases 22-27)."""

from __future__ import annotations

import pytest
from balance_steps import DAY, account, process_changes, register_change, signals, value
from factories import CONFIG_SCHEDULED_FOR_DELETION, DEFAULT_NOW, STATUS_DELETED, T0, insert_account

NOW = DEFAULT_NOW
DEBTOR_ID = 1
CREDITOR_ID = 1
SCHEDULED = CONFIG_SCHEDULED_FOR_DELETION


def try_to_delete(conn, creditor_id=CREDITOR_ID, *, now=NOW):
    return value(conn, "SELECT try_to_delete_account(%s, %s, %s)", (DEBTOR_ID, creditor_id, now))


def exists_for_the_protocol(conn, creditor_id=CREDITOR_ID):
    return value(conn, "SELECT (lock_existing_account(%s, %s)).creditor_id IS NOT NULL", (DEBTOR_ID, creditor_id))


def test_edge_22_scheduled_zero_account_is_deleted_and_announced(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=NOW - DAY, config_flags=SCHEDULED, last_change_seqnum=2)
    assert try_to_delete(conn) is True
    deleted = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert deleted["status_flags"] & STATUS_DELETED
    assert deleted["config_flags"] == SCHEDULED
    assert not exists_for_the_protocol(conn)
    [update] = signals(conn, "account_update_signal")
    assert (update["last_change_seqnum"], update["last_change_ts"], update["inserted_at"]) == (3, NOW, NOW)
    assert update["principal"] == 0


def test_edge_23_negative_balance_is_negligible(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, config_flags=SCHEDULED, principal=-5)
    assert try_to_delete(conn) is True
    [change] = signals(conn, "pending_balance_change_signal")
    assert (change["creditor_id"], change["principal_delta"], change["coordinator_type"]) == (0, -5, "delete")


def test_edge_24_remaining_principal_goes_back_to_root_and_interest_is_dropped(conn):
    insert_account(
        conn,
        DEBTOR_ID,
        CREDITOR_ID,
        config_flags=SCHEDULED,
        principal=2,
        interest=-1.0,
        negligible_amount=2.0,
        last_change_seqnum=5,
    )
    assert try_to_delete(conn) is True
    [change] = signals(conn, "pending_balance_change_signal")
    assert (change["creditor_id"], change["other_creditor_id"], change["principal_delta"]) == (0, CREDITOR_ID, 2)
    [transfer] = signals(conn, "account_transfer_signal")
    assert (transfer["acquired_amount"], transfer["principal"], transfer["coordinator_type"]) == (-2, 0, "delete")
    deleted = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (deleted["principal"], deleted["interest"]) == (0, 0.0)
    # One bump for the payment, one for the deletion.
    assert deleted["last_change_seqnum"] == 7


def test_edge_25_root_that_issued_money_and_is_not_scheduled_stays(conn):
    insert_account(conn, DEBTOR_ID, 0, principal=-1)
    assert try_to_delete(conn, 0) is False
    assert exists_for_the_protocol(conn, 0)


def test_scheduled_root_with_issued_money_stays(conn):
    insert_account(conn, DEBTOR_ID, 0, principal=-1, config_flags=SCHEDULED)
    assert try_to_delete(conn, 0) is False


def test_scheduled_root_with_zero_principal_is_deleted_whatever_its_interest(conn):
    insert_account(conn, DEBTOR_ID, 0, config_flags=SCHEDULED, interest=1000.0)
    assert try_to_delete(conn, 0) is True


def test_unscheduled_account_is_not_deleted_but_the_attempt_is_recorded(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID)
    assert try_to_delete(conn) is False
    kept = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (kept["status_flags"], kept["last_deletion_attempt_ts"], kept["last_change_seqnum"]) == (0, NOW, 0)
    assert signals(conn, "account_update_signal") == []


def test_account_with_prepared_transfers_is_not_deleted(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, config_flags=SCHEDULED, pending_transfers_count=1)
    assert try_to_delete(conn) is False


@pytest.mark.parametrize(
    ("principal", "interest", "negligible", "deleted"),
    [
        (2, 0.0, 0.0, True),
        (2, 1.0, 0.0, False),
        (3, 0.0, 2.0, False),
        (100, 0.0, 100.0, True),
        (101, 0.0, 100.0, False),
        (100, 0.5, 100.0, False),
    ],
)
def test_balance_must_not_exceed_the_negligible_amount_or_two(conn, principal, interest, negligible, deleted):
    insert_account(
        conn,
        DEBTOR_ID,
        CREDITOR_ID,
        config_flags=SCHEDULED,
        principal=principal,
        interest=interest,
        negligible_amount=negligible,
    )
    assert try_to_delete(conn) is deleted


def test_accrued_interest_counts_against_deletion(conn):
    insert_account(
        conn,
        DEBTOR_ID,
        CREDITOR_ID,
        now=NOW - 365 * DAY,
        config_flags=SCHEDULED,
        principal=100,
        negligible_amount=105.0,
        interest_rate=10.0,
    )
    assert try_to_delete(conn) is False


def test_missing_or_deleted_account_is_left_alone(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, config_flags=SCHEDULED, status_flags=STATUS_DELETED)
    assert try_to_delete(conn) is False
    assert try_to_delete(conn, CREDITOR_ID + 1) is False
    assert account(conn, DEBTOR_ID, CREDITOR_ID)["last_deletion_attempt_ts"] == T0
    assert signals(conn, "account_update_signal") == []


def test_edge_26_newer_config_resurrects_a_deleted_account(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=NOW - DAY, config_flags=SCHEDULED, interest_rate=10.0)
    try_to_delete(conn, now=NOW - DAY)
    # configure_account is the configure helper's (30_configure_account.sql).
    conn.execute(
        "SELECT configure_account(%s, %s, %s, 0, 0.0, 0, '', %s, %s)",
        (DEBTOR_ID, CREDITOR_ID, NOW + 1000 * DAY, 7 * 86400, NOW),
    )
    revived = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert (revived["status_flags"], revived["config_flags"], revived["interest_rate"]) == (0, 0, 10.0)


def test_edge_27_incoming_payment_resurrects_a_deleted_account(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=NOW - DAY, config_flags=SCHEDULED, interest_rate=10.0)
    try_to_delete(conn, now=NOW - DAY)
    register_change(conn, DEBTOR_ID, CREDITOR_ID, 100)
    process_changes(conn, DEBTOR_ID, CREDITOR_ID)
    revived = account(conn, DEBTOR_ID, CREDITOR_ID)
    assert exists_for_the_protocol(conn)
    assert (revived["status_flags"], revived["config_flags"], revived["interest_rate"]) == (0, SCHEDULED, 10.0)
    assert revived["principal"] == 100
    # Still scheduled: a later attempt may delete it again.
    assert not value(conn, "SELECT is_reachable_account(%s, %s)", (DEBTOR_ID, CREDITOR_ID))
