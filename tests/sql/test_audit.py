"""audit_ledger (issue 8, spec 02 §5): a ledger after real transfers audits clean,
and each kind of corruption made by hand is found and named."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from balance_steps import deliver_pending_balance_changes, pay
from factories import STATUS_OVERFLOWN
from transfer_steps import DEBTOR_ID, RECIPIENT_ID, SENDER_ID, finalize, prepare, rows

from pyswpt.parking import SOURCE_OUTBOX, SOURCE_QUEUE, Parcel, park

ALWAYS_LISTED = [
    "locked_amounts",
    "pending_transfer_counts",
    "transfer_number_links",
    "transfer_numbers_issued",
    "balance_change_archive",
    "conservation",
    "money_in_transit",
    "unreadable_parked_changes",
    "parked_messages",
]


def audit(conn: psycopg.Connection, *, holds_every_account: bool = True) -> dict[str, dict[str, Any]]:
    """The audit's rows by check name, in the order it returns them."""
    found = rows(conn, "SELECT * FROM audit_ledger(%s)", (holds_every_account,))
    return {row["check_name"]: row for row in found}


def statuses(conn: psycopg.Connection, **options: Any) -> dict[str, str]:
    return {name: row["status"] for name, row in audit(conn, **options).items()}


def not_ok(conn: psycopg.Connection, **options: Any) -> dict[str, str]:
    return {name: status for name, status in statuses(conn, **options).items() if status != "ok"}


def make_transfers(conn: psycopg.Connection) -> dict[str, Any]:
    """Issue money to two accounts, commit a transfer between them, and leave a second
    one prepared (a lock); every balance change delivered and applied."""
    pay(conn, DEBTOR_ID, SENDER_ID, 1_000)
    pay(conn, DEBTOR_ID, RECIPIENT_ID, 10)
    deliver_pending_balance_changes(conn)
    committed = prepare(conn, max_locked=300, request_id=1)
    assert committed is not None
    assert finalize(conn, committed, 200) is not None
    deliver_pending_balance_changes(conn)
    still_prepared = prepare(conn, max_locked=100, request_id=2)
    assert still_prepared is not None
    return still_prepared


def park_balance_change(conn: psycopg.Connection, body: bytes, *, routing_key: str = "0.1") -> None:
    """A PendingBalanceChange the consumer set aside, as it parks one."""
    park(
        conn,
        Parcel(
            source_kind=SOURCE_QUEUE,
            source_name="swpt_accounts",
            routing_key=routing_key,
            reason_code="refused",
            reason="refused by the database",
            body=body,
            message_type="PendingBalanceChange",
            debtor_id=None,
        ),
    )


def balance_change_body(principal_delta: int) -> bytes:
    """The root's side of a payment by RECIPIENT_ID, as the consumer received it."""
    return json.dumps(
        {
            "type": "PendingBalanceChange",
            "debtor_id": DEBTOR_ID,
            "creditor_id": 0,
            "change_id": 99,
            "other_creditor_id": RECIPIENT_ID,
            "principal_delta": principal_delta,
            "coordinator_type": "test",
            "committed_at": "2024-01-15T12:00:00+00:00",
            "transfer_note_format": "",
            "transfer_note": "",
        }
    ).encode()


@pytest.fixture
def ledger(conn):
    make_transfers(conn)
    return conn


def test_ledger_after_transfers_audits_clean(ledger):
    assert statuses(ledger) == dict.fromkeys(ALWAYS_LISTED, "ok")
    assert rows(ledger, "SELECT count(*) AS n FROM prepared_transfer")[0]["n"] == 1


def test_money_in_the_outbox_is_in_transit_not_a_violation(ledger):
    pay(ledger, DEBTOR_ID, RECIPIENT_ID, 50)
    found = audit(ledger)
    assert not_ok(ledger) == {"money_in_transit": "info"}
    assert found["money_in_transit"]["found_count"] == 1
    assert found["money_in_transit"]["first_keys"] == [f"debtor {DEBTOR_ID}: -50 (unsent -50, queued 0, parked 0)"]


def test_wrong_total_locked_amount_is_found(ledger):
    ledger.execute(
        "UPDATE account SET total_locked_amount = total_locked_amount + 1 WHERE debtor_id = %s AND creditor_id = %s",
        (DEBTOR_ID, SENDER_ID),
    )
    found = audit(ledger)
    assert not_ok(ledger) == {"locked_amounts": "VIOLATION"}
    assert found["locked_amounts"]["found_count"] == 1
    assert found["locked_amounts"]["first_keys"] == [
        f"({DEBTOR_ID}, {SENDER_ID}) total_locked_amount 101, prepared 100"
    ]


def test_wrong_pending_transfers_count_is_found(ledger):
    ledger.execute(
        "UPDATE account SET pending_transfers_count = 0 WHERE debtor_id = %s AND creditor_id = %s",
        (DEBTOR_ID, SENDER_ID),
    )
    assert not_ok(ledger) == {"pending_transfer_counts": "VIOLATION"}
    assert audit(ledger)["pending_transfer_counts"]["first_keys"] == [
        f"({DEBTOR_ID}, {SENDER_ID}) pending_transfers_count 0, prepared 1"
    ]


def test_a_lost_prepared_transfer_is_found_by_both_lock_checks(ledger):
    ledger.execute("DELETE FROM prepared_transfer")
    assert not_ok(ledger) == {"locked_amounts": "VIOLATION", "pending_transfer_counts": "VIOLATION"}


def test_a_broken_link_in_a_transfer_number_chain_is_found(ledger):
    # The sender's AccountTransfers: #1 (the payment), #2 (the commit). A gap before #2:
    ledger.execute(
        "UPDATE account_transfer_signal SET previous_transfer_number = 0"
        " WHERE creditor_id = %s AND transfer_number = 2",
        (SENDER_ID,),
    )
    found = audit(ledger)
    assert not_ok(ledger) == {"transfer_number_links": "VIOLATION"}
    assert found["transfer_number_links"]["first_keys"][0].startswith(f"({DEBTOR_ID}, {SENDER_ID}) ")
    assert found["transfer_number_links"]["first_keys"][0].endswith(" #2 after #0")


def test_a_transfer_number_beyond_the_accounts_last_is_found(ledger):
    ledger.execute(
        "UPDATE account SET last_transfer_number = 1 WHERE debtor_id = %s AND creditor_id = %s",
        (DEBTOR_ID, SENDER_ID),
    )
    found = audit(ledger)
    assert not_ok(ledger) == {"transfer_numbers_issued": "VIOLATION"}
    assert found["transfer_numbers_issued"]["first_keys"][0].endswith("#2 beyond last_transfer_number 1")


def test_last_transfer_committed_at_must_match_the_last_unsent_transfer(ledger):
    ledger.execute(
        "UPDATE account SET last_transfer_committed_at = last_transfer_committed_at - interval '1 second'"
        " WHERE debtor_id = %s AND creditor_id = %s",
        (DEBTOR_ID, SENDER_ID),
    )
    assert not_ok(ledger) == {"transfer_numbers_issued": "VIOLATION"}


def test_an_account_transfer_of_a_root_account_is_found(ledger):
    # Dated as an earlier incarnation of the root account, so that only the root rule applies.
    ledger.execute(
        "INSERT INTO account_transfer_signal"
        " SELECT debtor_id, 0, creation_date - 1, 1, coordinator_type, committed_at, acquired_amount,"
        " other_creditor_id, transfer_note_format, transfer_note, principal, 0, inserted_at"
        " FROM account_transfer_signal WHERE creditor_id = %s AND transfer_number = 1",
        (SENDER_ID,),
    )
    found = audit(ledger)
    assert not_ok(ledger) == {"transfer_numbers_issued": "VIOLATION"}
    assert found["transfer_numbers_issued"]["first_keys"][0].endswith("#1 of a root account")


def test_archive_and_queue_must_agree(conn):
    pay(conn, DEBTOR_ID, SENDER_ID, 70)
    deliver_pending_balance_changes(conn)
    conn.execute("UPDATE registered_balance_change SET is_applied = false")
    found = audit(conn)
    assert not_ok(conn) == {"balance_change_archive": "VIOLATION"}
    assert found["balance_change_archive"]["first_keys"][0].endswith(" unapplied but not queued")


def test_principals_not_matching_the_changes_break_conservation(ledger):
    ledger.execute(
        "UPDATE account SET principal = principal + 7 WHERE debtor_id = %s AND creditor_id = %s",
        (DEBTOR_ID, RECIPIENT_ID),
    )
    found = audit(ledger)
    assert not_ok(ledger) == {"conservation": "VIOLATION"}
    assert found["conservation"]["first_keys"] == [f"debtor {DEBTOR_ID}: principals 7, in transit 0"]


def test_conservation_is_information_when_other_shards_hold_accounts(ledger):
    ledger.execute("UPDATE account SET principal = principal + 7 WHERE creditor_id = %s", (RECIPIENT_ID,))
    assert not_ok(ledger, holds_every_account=False) == {"conservation": "info"}


def test_an_overflown_account_exempts_its_debtor_from_conservation(ledger):
    ledger.execute(
        "UPDATE account SET principal = principal + 7, status_flags = status_flags | %s WHERE creditor_id = %s",
        (STATUS_OVERFLOWN, RECIPIENT_ID),
    )
    assert not_ok(ledger) == {"conservation": "info"}


def test_a_parked_balance_change_is_money_in_transit(ledger):
    # The account paid the root 30; the root's change was published, then refused by
    # the consumer and parked: one side was debited, the other never credited.
    pay(ledger, DEBTOR_ID, RECIPIENT_ID, -30)
    ledger.execute("DELETE FROM pending_balance_change_signal")
    assert not_ok(ledger)["conservation"] == "VIOLATION"

    park_balance_change(ledger, balance_change_body(30))
    found = audit(ledger)
    assert not_ok(ledger) == {"money_in_transit": "warning", "parked_messages": "warning"}
    assert found["money_in_transit"]["first_keys"] == [f"debtor {DEBTOR_ID}: 30 (unsent 0, queued 0, parked 30)"]
    assert found["money_in_transit"]["detail"].startswith("0 changes unsent, 0 queued, 1 parked")
    assert found["parked_messages"]["first_keys"][0].endswith(": PendingBalanceChange refused")


def test_an_outbox_row_parked_without_a_message_is_money_in_transit(ledger):
    # The flusher could not build the message of the root's change: it parked the
    # row's columns as text, without a message type or body.
    pay(ledger, DEBTOR_ID, RECIPIENT_ID, -30)
    (row,) = rows(ledger, "DELETE FROM pending_balance_change_signal RETURNING *")
    park(
        ledger,
        Parcel(
            source_kind=SOURCE_OUTBOX,
            source_name="pending_balance_changes",
            routing_key="",
            reason_code="unreadable",
            reason="a column cannot be loaded",
            row_data={column: None if value is None else str(value) for column, value in row.items()},
            debtor_id=DEBTOR_ID,
            creditor_id=row["creditor_id"],
        ),
    )
    found = audit(ledger)
    assert not_ok(ledger) == {"money_in_transit": "warning", "parked_messages": "warning"}
    assert found["money_in_transit"]["first_keys"] == [f"debtor {DEBTOR_ID}: 30 (unsent 0, queued 0, parked 30)"]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"\xff\xfe", b"[1, 2]", json.dumps({"debtor_id": DEBTOR_ID, "principal_delta": 1.5}).encode()],
    ids=["not json", "not utf-8", "not an object", "fractional amount"],
)
def test_an_unreadable_parked_balance_change_is_reported_not_fatal(ledger, body):
    park_balance_change(ledger, body)
    found = audit(ledger)
    assert not_ok(ledger) == {"unreadable_parked_changes": "warning", "parked_messages": "warning"}
    (parked_id,) = [row["parked_id"] for row in rows(ledger, "SELECT parked_id FROM parked_message")]
    assert found["unreadable_parked_changes"]["first_keys"] == [f"parked {parked_id}"]


def test_keys_are_bounded_and_counted(conn):
    for creditor_id in range(1, 9):
        pay(conn, DEBTOR_ID, creditor_id, 5)
    conn.execute("UPDATE account SET pending_transfers_count = 3")
    found = rows(conn, "SELECT * FROM audit_ledger(true, 2) WHERE check_name = 'pending_transfer_counts'")[0]
    assert found["found_count"] == 8
    assert found["first_keys"] == [
        f"({DEBTOR_ID}, 1) pending_transfers_count 3, prepared 0",
        f"({DEBTOR_ID}, 2) pending_transfers_count 3, prepared 0",
    ]
