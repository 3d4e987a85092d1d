"""SMP end to end: consumer, workers and flusher as real processes, peers simulated on the broker.

Each test gets a fresh database (emptied tables), its own SMP queue and a
random debtor id, starts the drivers with short waits, publishes what a peer
would send straight into the queue, and catches what pyswpt sends on
`to_creditors`, `to_debtors`, `to_coordinators` (through its bindings) and
`accounts_in`. Bodies are compared field by field, with types (so `0` is not
`0.0`), and the raw body must be the compact form of spec 01 §2.1.

Only the accounts a test names are bound (no `#`): the broker is shared with
other test runs, and a stranger's message in this queue could create an
account whose updates nobody routes, holding back this test's flusher.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from broker import Received, declare_smp_exchanges
from conftest import new_database
from drivers import Running, wait_for
from peers import (
    JSON,
    MAX_COMMIT_DELAY_SECONDS,
    MAX_INT32,
    WAIT_SECONDS,
    Like,
    Recent,
    Shard,
    account_update_fields,
    assert_smp_message,
    by_type,
    first_transfer_id,
    funded_pair,
    now,
    open_account,
    open_root_account,
    open_shard,
    prepare_and_take,
    process_group,
    random_id,
    wire_time,
)
from test_web import web_server

from pyswpt import schema, topology
from pyswpt.sharding import Realm, hex_routing_key, u64_string

# Before RabbitMQ 3.12 a message dead-lettered into a stream is dropped.
STREAM_DEAD_LETTERING_SINCE = (3, 12)


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


@pytest.fixture
def shard(conn, database_url, rabbitmq_url, tmp_path) -> Iterator[Shard]:
    with open_shard(conn, database_url, rabbitmq_url, tmp_path) as opened:
        yield opened


def start_all(shard: Shard, **settings: str) -> list[Running]:
    return shard.start("consumer", "workers", "flusher", **settings)


# --- ConfigureAccount ------------------------------------------------------------------


def test_configure_account_creates_the_account_and_sends_one_account_update(shard):
    start_all(shard)
    creditor = shard.creditor()
    since = now()
    config = shard.configure(creditor, seqnum=7, negligible_amount=2.5, config_flags=0)

    [update] = shard.inbox.take(1)
    assert_smp_message(
        update, "to_creditors", hex_routing_key(creditor), account_update_fields(shard, creditor, config, since)
    )
    assert update.fields["ts"] == update.fields["last_change_ts"]
    assert shard.account(creditor)["principal"] == 0
    shard.settle()
    shard.inbox.assert_empty()


def test_root_account_update_goes_to_the_debtor(shard):
    start_all(shard)
    since = now()
    config = shard.configure(0, negligible_amount=1e30, config_data='{"rate": 2.5}', seqnum=-3)

    [update] = shard.inbox.take(1)
    expected = account_update_fields(shard, 0, config, since)
    assert_smp_message(update, "to_debtors", hex_routing_key(shard.debtor_id), expected)
    assert b'"negligible_amount":1e+30,' in update.body
    assert b'"config_data":"{\\"rate\\": 2.5}"' in update.body


def test_new_account_takes_the_interest_rate_of_its_debtor(shard):
    start_all(shard)
    creditor = shard.creditor()
    open_account(shard, 0, config_data='{"rate": 2.5}')
    since = now()
    config = shard.configure(creditor)

    created, initialised = shard.inbox.take(2)
    assert_smp_message(
        created, "to_creditors", hex_routing_key(creditor), account_update_fields(shard, creditor, config, since)
    )
    expected = account_update_fields(
        shard,
        creditor,
        config,
        since,
        interest_rate=2.5,
        last_change_seqnum=2,
        last_interest_rate_change_ts=Recent(since),
    )
    assert_smp_message(initialised, "to_creditors", hex_routing_key(creditor), expected)
    shard.settle()
    shard.inbox.assert_empty()


def test_older_config_is_ignored(shard):
    start_all(shard)
    creditor = shard.creditor()
    ts = now()
    shard.configure(creditor, ts=ts, seqnum=5)
    shard.configure(creditor, ts=ts, seqnum=4, config_flags=1)  # same ts, earlier seqnum
    shard.configure(creditor, ts=ts - dt.timedelta(microseconds=1), seqnum=9, config_flags=1)
    shard.configure(creditor, ts=ts, seqnum=6)

    first, second = shard.inbox.take(2)
    # Had either old config been applied, the second update would carry it (seqnum 2,
    # flags 1) and the newer config would come third.
    assert (first.fields["last_change_seqnum"], first.fields["last_config_seqnum"]) == (1, 5)
    assert (second.fields["last_change_seqnum"], second.fields["last_config_seqnum"]) == (2, 6)
    assert second.fields["config_flags"] == 0
    shard.settle()
    shard.inbox.assert_empty()


def test_invalid_config_is_answered_with_rejected_config_and_creates_nothing(shard):
    start_all(shard)
    creditor = shard.creditor()
    since = now()
    # Spec 01 §2.1: the negligible amount echoes the float32 column, 0.1 stays 0.1.
    config = shard.configure(creditor, seqnum=123, negligible_amount=0.1, config_data="xyz", config_flags=0x1FFF)

    [rejected] = shard.inbox.take(1)
    assert_smp_message(
        rejected,
        "to_creditors",
        hex_routing_key(creditor),
        {
            "type": "RejectedConfig",
            "debtor_id": shard.debtor_id,
            "creditor_id": creditor,
            "config_ts": config["ts"],
            "config_seqnum": 123,
            "negligible_amount": 0.1,
            "config_data": "xyz",
            "config_flags": 0x1FFF,
            "rejection_code": "INVALID_CONFIGURATION",
            "ts": Recent(since),
        },
    )
    assert shard.account(creditor) is None


def test_invalid_root_config_is_rejected_to_the_debtor(shard):
    start_all(shard)
    since = now()
    config = shard.configure(0, config_data="INVALID_CONFIG")

    [rejected] = shard.inbox.take(1)
    assert_smp_message(
        rejected,
        "to_debtors",
        hex_routing_key(shard.debtor_id),
        {
            "type": "RejectedConfig",
            "debtor_id": shard.debtor_id,
            "creditor_id": 0,
            "config_ts": config["ts"],
            "config_seqnum": 1,
            "negligible_amount": 0.0,
            "config_data": "INVALID_CONFIG",
            "config_flags": 0,
            "rejection_code": "INVALID_CONFIGURATION",
            "ts": Recent(since),
        },
    )
    assert shard.account(0) is None


# --- transfers ---------------------------------------------------------------------------


def prepared_transfer_fields(
    request: dict[str, Any], transfer_id: int, locked_amount: int, recipient: int, since: dt.datetime
) -> dict[str, Any]:
    return {
        "type": "PreparedTransfer",
        "debtor_id": request["debtor_id"],
        "creditor_id": request["creditor_id"],
        "transfer_id": transfer_id,
        "coordinator_type": request["coordinator_type"],
        "coordinator_id": request["coordinator_id"],
        "coordinator_request_id": request["coordinator_request_id"],
        "locked_amount": locked_amount,
        "recipient": u64_string(recipient),
        "prepared_at": Recent(since),
        "ts": Recent(since),
        "demurrage_rate": -50.0,
        # min(prepared_at + commit_period, ts + max_commit_delay): the latter here.
        "deadline": wire_time(
            dt.datetime.fromisoformat(request["ts"]) + dt.timedelta(seconds=MAX_COMMIT_DELAY_SECONDS)
        ),
        "final_interest_rate_ts": request["final_interest_rate_ts"],
    }


def test_issuing_transfer_credits_a_recipient_in_the_shard_without_a_pending_balance_change(shard):
    start_all(shard)
    recipient = shard.creditor()
    root = open_root_account(shard)
    created = open_account(shard, recipient)
    since = now()
    request = shard.prepare(
        0,
        u64_string(recipient),
        request_id=11,
        min_locked=1000,
        max_locked=1000,
        coordinator_type="issuing",
        coordinator_id=shard.debtor_id,
    )

    [prepared] = shard.inbox.take(1)
    transfer_id = first_transfer_id(root["creation_date"])
    expected = prepared_transfer_fields(request, transfer_id, 1000, recipient, since)
    # to_coordinators forwards `issuing` to to_debtors, keyed by the coordinator (the debtor).
    assert_smp_message(prepared, "to_coordinators", hex_routing_key(shard.debtor_id), expected)
    assert prepared.fields["ts"] == prepared.fields["prepared_at"]

    note = "Issued — добре дошли"
    shard.finalize(prepared.fields, 1000, note=note, note_format="text")
    # The recipient is in this shard: the change is queued by the finalization, not sent through accounts_in.
    arrived = by_type(shard.inbox.take(2))
    assert sorted(arrived) == ["AccountTransfer", "FinalizedTransfer"]
    finalized = arrived["FinalizedTransfer"]
    assert_smp_message(
        finalized,
        "to_coordinators",
        hex_routing_key(shard.debtor_id),
        {
            "type": "FinalizedTransfer",
            "debtor_id": shard.debtor_id,
            "creditor_id": 0,
            "transfer_id": transfer_id,
            "coordinator_type": "issuing",
            "coordinator_id": shard.debtor_id,
            "coordinator_request_id": 11,
            "prepared_at": prepared.fields["prepared_at"],
            "ts": Recent(since),
            "committed_amount": 1000,
            "total_locked_amount": 0,
            "status_code": "OK",
        },
    )
    committed_at = finalized.fields["ts"]
    # The root account sends no AccountTransfer.
    assert_smp_message(
        arrived["AccountTransfer"],
        "to_creditors",
        hex_routing_key(recipient),
        {
            "type": "AccountTransfer",
            "debtor_id": shard.debtor_id,
            "creditor_id": recipient,
            "creation_date": created["creation_date"],
            "transfer_number": 1,
            "coordinator_type": "issuing",
            "committed_at": committed_at,
            "acquired_amount": 1000,
            "transfer_note_format": "text",
            "transfer_note": note,
            "principal": 1000,
            "previous_transfer_number": 0,
            "sender": "0",
            "recipient": u64_string(recipient),
            "ts": Recent(since),
        },
    )
    assert (shard.principal(0), shard.principal(recipient)) == (-1000, 1000)
    shard.settle()
    shard.inbox.assert_empty()


def test_committed_direct_transfer_moves_money_and_reports_both_sides(shard):
    start_all(shard)
    sender, recipient = funded_pair(shard, 1000)
    sender_created = shard.account(sender)["creation_date"].isoformat()
    recipient_created = shard.account(recipient)["creation_date"].isoformat()
    since = now()
    request = shard.prepare(sender, u64_string(recipient), request_id=42, min_locked=100, max_locked=400)

    [prepared] = shard.inbox.take(1)
    transfer_id = first_transfer_id(sender_created)
    expected = prepared_transfer_fields(request, transfer_id, 400, recipient, since)
    assert_smp_message(prepared, "to_coordinators", hex_routing_key(sender), expected)

    shard.finalize(prepared.fields, 300, note="Hello, Мир")
    # Both sides' AccountTransfers, in either order, and no PendingBalanceChange (one shard).
    finalized, sender_transfer, recipient_transfer = shard.inbox.expect(
        Like("FinalizedTransfer"),
        Like("AccountTransfer", creditor_id=sender),
        Like("AccountTransfer", creditor_id=recipient),
    )
    assert_smp_message(
        finalized,
        "to_coordinators",
        hex_routing_key(sender),
        {
            "type": "FinalizedTransfer",
            "debtor_id": shard.debtor_id,
            "creditor_id": sender,
            "transfer_id": transfer_id,
            "coordinator_type": "direct",
            "coordinator_id": sender,
            "coordinator_request_id": 42,
            "prepared_at": prepared.fields["prepared_at"],
            "ts": Recent(since),
            "committed_amount": 300,
            "total_locked_amount": 0,
            "status_code": "OK",
        },
    )
    committed_at = finalized.fields["ts"]
    assert_smp_message(
        sender_transfer,
        "to_creditors",
        hex_routing_key(sender),
        {
            "type": "AccountTransfer",
            "debtor_id": shard.debtor_id,
            "creditor_id": sender,
            "creation_date": sender_created,
            "transfer_number": 2,
            "coordinator_type": "direct",
            "committed_at": committed_at,
            "acquired_amount": -300,
            "transfer_note_format": "",
            "transfer_note": "Hello, Мир",
            "principal": 700,
            "previous_transfer_number": 1,
            "sender": u64_string(sender),
            "recipient": u64_string(recipient),
            "ts": Recent(since),
        },
    )
    assert_smp_message(
        recipient_transfer,
        "to_creditors",
        hex_routing_key(recipient),
        {
            "type": "AccountTransfer",
            "debtor_id": shard.debtor_id,
            "creditor_id": recipient,
            "creation_date": recipient_created,
            "transfer_number": 1,
            "coordinator_type": "direct",
            "committed_at": committed_at,
            "acquired_amount": 300,
            "transfer_note_format": "",
            "transfer_note": "Hello, Мир",
            "principal": 300,
            "previous_transfer_number": 0,
            "sender": u64_string(sender),
            "recipient": u64_string(recipient),
            "ts": Recent(since),
        },
    )
    assert (shard.principal(sender), shard.principal(recipient), shard.principal(0)) == (700, 300, -1000)
    assert shard.account(sender)["total_locked_amount"] == 0
    shard.settle()
    shard.inbox.assert_empty()


def test_dismissal_releases_the_lock_and_moves_nothing(shard):
    start_all(shard)
    sender, recipient = funded_pair(shard, 1000)
    prepared = prepare_and_take(shard, sender, recipient, request_id=5, min_locked=0, max_locked=500)
    assert prepared["locked_amount"] == 500
    assert shard.account(sender)["total_locked_amount"] == 500
    since = now()

    shard.finalize(prepared, 0)
    [finalized] = shard.inbox.take(1)
    assert_smp_message(
        finalized,
        "to_coordinators",
        hex_routing_key(sender),
        {
            "type": "FinalizedTransfer",
            "debtor_id": shard.debtor_id,
            "creditor_id": sender,
            "transfer_id": prepared["transfer_id"],
            "coordinator_type": "direct",
            "coordinator_id": sender,
            "coordinator_request_id": 5,
            "prepared_at": prepared["prepared_at"],
            "ts": Recent(since),
            "committed_amount": 0,
            "total_locked_amount": 0,
            "status_code": "OK",
        },
    )
    shard.settle()
    shard.inbox.assert_empty()  # no AccountTransfer
    account = shard.account(sender)
    assert (account["principal"], account["total_locked_amount"], account["pending_transfers_count"]) == (1000, 0, 0)


# --- RejectedTransfer ----------------------------------------------------------------------


def assert_rejected_transfer(
    shard: Shard,
    message: Received,
    request: dict[str, Any],
    status_code: str,
    total_locked_amount: int,
    since: dt.datetime,
) -> None:
    assert_smp_message(
        message,
        "to_coordinators",
        hex_routing_key(request["coordinator_id"]),
        {
            "type": "RejectedTransfer",
            "coordinator_type": request["coordinator_type"],
            "coordinator_id": request["coordinator_id"],
            "coordinator_request_id": request["coordinator_request_id"],
            "status_code": status_code,
            "total_locked_amount": total_locked_amount,
            "debtor_id": shard.debtor_id,
            "creditor_id": request["creditor_id"],
            "ts": Recent(since),
        },
    )


@pytest.mark.parametrize("recipient", ["not-a-number", "-5", str(2**64), "", "missing"])
def test_unreachable_recipient_is_rejected_at_intake(shard, recipient):
    # No workers: the intake itself answers, before the sender is looked at.
    shard.start("consumer", "flusher")
    sender = shard.creditor()
    if recipient == "missing":
        recipient = u64_string(random_id())  # an account this shard does not have
    since = now()
    request = shard.prepare(sender, recipient, request_id=3, min_locked=0, max_locked=10)

    [rejected] = shard.inbox.take(1)
    assert_rejected_transfer(shard, rejected, request, "RECIPIENT_IS_UNREACHABLE", 0, since)
    assert shard.count("SELECT count(*) FROM transfer_request") == 0


def test_missing_sender_is_unreachable(shard):
    start_all(shard)
    sender, recipient = shard.creditor(), shard.creditor()
    open_account(shard, recipient)
    since = now()
    request = shard.prepare(sender, u64_string(recipient), request_id=4, min_locked=0, max_locked=10)

    [rejected] = shard.inbox.take(1)
    assert_rejected_transfer(shard, rejected, request, "SENDER_IS_UNREACHABLE", 0, since)


def test_transfer_to_oneself_is_rejected(shard):
    start_all(shard)
    sender = shard.creditor()
    open_account(shard, sender)
    since = now()
    request = shard.prepare(sender, u64_string(sender), request_id=5, min_locked=0, max_locked=10)

    [rejected] = shard.inbox.take(1)
    assert_rejected_transfer(shard, rejected, request, "RECIPIENT_SAME_AS_SENDER", 0, since)


def test_transfer_fixed_before_the_last_rate_change_is_rejected(shard):
    start_all(shard)
    sender, recipient = shard.creditor(), shard.creditor()
    open_account(shard, sender)
    open_account(shard, recipient)
    since = now()
    # The account's rate last changed at T0; the sender agreed only to rates before it.
    request = shard.prepare(
        sender,
        u64_string(recipient),
        request_id=6,
        min_locked=0,
        max_locked=10,
        final_interest_rate_ts="1969-12-31T23:59:00+00:00",
    )

    [rejected] = shard.inbox.take(1)
    assert_rejected_transfer(shard, rejected, request, "NEWER_INTEREST_RATE", 0, since)


def test_transfer_above_the_available_amount_is_rejected_with_the_current_locks(shard):
    start_all(shard)
    sender, recipient = funded_pair(shard, 1000)
    prepare_and_take(shard, sender, recipient, request_id=7, min_locked=800, max_locked=800)
    since = now()
    request = shard.prepare(sender, u64_string(recipient), request_id=8, min_locked=500, max_locked=500)

    [rejected] = shard.inbox.take(1)
    assert_rejected_transfer(shard, rejected, request, "INSUFFICIENT_AVAILABLE_AMOUNT", 800, since)


def test_sender_with_too_many_pending_transfers_is_rejected(shard):
    start_all(shard)
    sender, recipient = shard.creditor(), shard.creditor()
    open_account(shard, sender)
    open_account(shard, recipient)
    # Arranged in SQL: 2^31-1 pending transfers cannot be prepared in a test.
    shard.conn.execute(
        "UPDATE account SET pending_transfers_count = %s WHERE debtor_id = %s AND creditor_id = %s",
        (MAX_INT32, shard.debtor_id, sender),
    )
    since = now()
    request = shard.prepare(sender, u64_string(recipient), request_id=9, min_locked=0, max_locked=10)

    [rejected] = shard.inbox.take(1)
    assert_rejected_transfer(shard, rejected, request, "TOO_MANY_TRANSFERS", 0, since)


def test_agent_transfer_to_another_agent_s_creditor_is_unreachable(shard):
    start_all(shard)
    agent = random.randint(1, 2**23) << 40
    sender = shard.creditor(agent | 0x1234)
    coordinator = shard.creditor(agent | 0xFFFF)
    open_account(shard, sender)
    since = now()
    # The recipient is not looked up for agents; the processor finds it is another agent's.
    other_agent_creditor = (agent + (1 << 40)) | 0x1234
    request = shard.prepare(
        sender,
        u64_string(other_agent_creditor),
        request_id=10,
        min_locked=0,
        max_locked=0,
        coordinator_type="agent",
        coordinator_id=coordinator,
    )

    [rejected] = shard.inbox.take(1)
    assert_rejected_transfer(shard, rejected, request, "RECIPIENT_IS_UNREACHABLE", 0, since)


# --- redelivery ---------------------------------------------------------------------------


def test_redelivered_finalize_transfer_commits_once(shard):
    start_all(shard)
    sender, recipient = funded_pair(shard, 1000)
    prepared = prepare_and_take(shard, sender, recipient, request_id=12, min_locked=0, max_locked=400)

    finalize = shard.finalize(prepared, 300)
    shard.publish("FinalizeTransfer", finalize)  # redelivered before it was processed
    finalized, _sent, arrived_at_recipient = shard.inbox.expect(
        Like("FinalizedTransfer"),
        Like("AccountTransfer", creditor_id=sender),
        Like("AccountTransfer", creditor_id=recipient),
    )
    assert finalized.fields["committed_amount"] == 300
    assert arrived_at_recipient.fields["acquired_amount"] == 300
    shard.publish("FinalizeTransfer", finalize)  # redelivered after it was processed
    shard.settle()

    shard.inbox.assert_empty()
    assert (shard.principal(sender), shard.principal(recipient)) == (700, 300)


def test_redelivered_pending_balance_change_is_applied_once(shard):
    start_all(shard)
    creditor, other = shard.creditor(), random_id()
    change = shard.balance_change(creditor, other, change_id=77, principal_delta=5)
    shard.publish("PendingBalanceChange", change)

    arrived = by_type(shard.inbox.take(2))  # the account is created (B4) and credited
    assert arrived["AccountUpdate"].fields["principal"] == 0
    assert arrived["AccountTransfer"].fields["acquired_amount"] == 5
    shard.publish("PendingBalanceChange", change)
    shard.settle()

    shard.inbox.assert_empty()
    assert shard.principal(creditor) == 5
    archived = "SELECT count(*) FROM registered_balance_change WHERE debtor_id = %s AND other_creditor_id = %s"
    assert shard.count(archived, shard.debtor_id, other) == 1


def test_redelivered_prepare_transfer_gets_the_same_prepared_transfer_while_it_is_prepared(shard):
    """A duplicate of a prepared request is answered with its PreparedTransfer again.

    The reference would lock a second time and leave the extra transfer for the
    coordinator to dismiss; pyswpt finds the prepared transfer by its coordinator
    request and sends it again, whether the duplicate came in the same batch or later.
    """
    start_all(shard)
    sender, recipient = funded_pair(shard, 1000)
    request = shard.prepare(sender, u64_string(recipient), request_id=13, min_locked=0, max_locked=300)
    shard.publish("PrepareTransfer", request)  # redelivered before it was processed
    first, second = (message.fields for message in shard.inbox.take(2))
    shard.publish("PrepareTransfer", request)  # redelivered after it was processed
    [third] = (message.fields for message in shard.inbox.take(1))

    assert {first["type"], second["type"], third["type"]} == {"PreparedTransfer"}
    assert first["transfer_id"] == second["transfer_id"] == third["transfer_id"]
    assert first["prepared_at"] == second["prepared_at"] == third["prepared_at"]
    assert first["locked_amount"] == second["locked_amount"] == third["locked_amount"] == 300
    account = shard.account(sender)
    assert (account["total_locked_amount"], account["pending_transfers_count"]) == (300, 1)


def test_prepare_transfer_repeated_after_finalization_prepares_a_new_transfer(shard):
    """Once finalized, the request is forgotten: a late duplicate locks again, as in the
    reference, and the coordinator dismisses the transfer it does not know."""
    start_all(shard)
    sender, recipient = funded_pair(shard, 1000)
    request = shard.prepare(sender, u64_string(recipient), request_id=14, min_locked=0, max_locked=300)
    [prepared] = shard.inbox.take(1)
    shard.finalize(prepared.fields, 0)
    [finalized] = shard.inbox.take(1)
    assert finalized.fields["total_locked_amount"] == 0

    shard.publish("PrepareTransfer", request)
    [again] = shard.inbox.take(1)
    assert again.properties.type == "PreparedTransfer"
    assert again.fields["transfer_id"] == prepared.fields["transfer_id"] + 1
    assert shard.account(sender)["total_locked_amount"] == 300


# --- bad input ------------------------------------------------------------------------------


def valid_config(shard: Shard, creditor_id: int) -> dict[str, Any]:
    return {
        "type": "ConfigureAccount",
        "debtor_id": shard.debtor_id,
        "creditor_id": creditor_id,
        "negligible_amount": 0.0,
        "config_data": "",
        "config_flags": 0,
        "seqnum": 1,
        "ts": wire_time(now()),
    }


def valid_finalize(shard: Shard, creditor_id: int) -> dict[str, Any]:
    return {
        "type": "FinalizeTransfer",
        "debtor_id": shard.debtor_id,
        "creditor_id": creditor_id,
        "transfer_id": 1,
        "coordinator_type": "direct",
        "coordinator_id": creditor_id,
        "coordinator_request_id": 1,
        "committed_amount": 0,
        "transfer_note_format": "",
        "transfer_note": "",
        "ts": wire_time(now()),
    }


BAD_MESSAGES = {
    # name: (content type, type property, fields to change or raw body, expected log line)
    "invalid JSON": (JSON, "ConfigureAccount", b'{"type": "ConfigureAccount", ', "does not contain a valid JSON"),
    "unknown type": (JSON, "ConfigureAccounts", {}, 'Unknown message type: "ConfigureAccounts"'),
    "wrong content type": ("text/plain", "ConfigureAccount", {}, 'Unknown message content type: "text/plain"'),
    "content type with charset": (
        "application/json; charset=utf-8",
        "ConfigureAccount",
        {},
        'Unknown message content type: "application/json; charset=utf-8"',
    ),
    "type property differs from the body": (JSON, "ConfigureAccount", {"type": "PrepareTransfer"}, "'type'"),
    "i32 out of range": (JSON, "ConfigureAccount", {"config_flags": 2**31}, "'config_flags'"),
    "i64 out of range": (JSON, "ConfigureAccount", {"debtor_id": 2**63}, "'debtor_id'"),
    "over-long note": (JSON, "FinalizeTransfer", {"transfer_note": "x" * 501}, "'transfer_note'"),
    "note over 500 bytes": (JSON, "FinalizeTransfer", {"transfer_note": "й" * 251}, "'transfer_note'"),
    "invalid note format": (JSON, "FinalizeTransfer", {"transfer_note_format": "a b"}, "'transfer_note_format'"),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_message_is_rejected_and_the_next_one_is_processed(shard, case):
    content_type, message_type, change, reason = BAD_MESSAGES[case]
    creditor, next_creditor = shard.creditor(), shard.creditor()
    if isinstance(change, bytes):
        body = change
    else:
        valid = valid_finalize(shard, creditor) if message_type == "FinalizeTransfer" else valid_config(shard, creditor)
        body = json.dumps({**valid, **change}).encode()
    shard.publish(message_type, content_type=content_type, body=body)
    shard.configure(next_creditor)

    [consumer] = shard.start("consumer")
    wait_for(lambda: shard.account(next_creditor) is not None, "the next message to be processed")
    assert shard.account(creditor) is None
    assert shard.count("SELECT count(*) FROM finalization_request") == 0
    consumer.stop()
    # Stopped: an unsettled message would be back in the queue now.
    assert shard.ready_messages() == 0
    assert reason in consumer.log()
    assert_dead_lettered(shard, body)


def assert_dead_lettered(shard: Shard, body: bytes) -> None:
    """On RabbitMQ >= 3.12 the rejected message is in `<queue>.XQ` (older ones drop it)."""
    connection = shard.channel.connection
    version_text = connection._impl.server_properties["version"]
    version_text = version_text.decode() if isinstance(version_text, bytes) else version_text
    version = tuple(int(part) for part in version_text.split(".")[:2] if part.isdigit())
    if version < STREAM_DEAD_LETTERING_SINCE:
        return
    reader = connection.channel()
    reader.basic_qos(prefetch_count=10)
    stream = reader.consume(
        topology.dead_letter_queue_name(shard.queue),
        arguments={"x-stream-offset": "first"},
        inactivity_timeout=WAIT_SECONDS,
    )
    _method, _properties, dead = next(stream)
    reader.cancel()
    assert dead == body


def test_message_for_an_account_of_another_shard_is_rejected(shard):
    # Spec 01 §4.2: (123, 456) belongs to shard 0.#, so a 1.# shard must not apply it.
    realm = Realm.from_binding_key("1.#")
    assert not realm.owns(123, 456)
    own = next(c for c in iter(random_id, None) if realm.owns(shard.debtor_id, c))
    shard.publish("ConfigureAccount", {**valid_config(shard, 456), "debtor_id": 123})
    shard.configure(own)

    [consumer] = shard.start("consumer", PROTOCOL_BROKER_QUEUE_ROUTING_KEY="1.#")
    wait_for(lambda: shard.account(own) is not None, "the next message to be processed")
    consumer.stop()
    assert shard.ready_messages() == 0
    assert shard.count("SELECT count(*) FROM account WHERE debtor_id = 123") == 0
    assert "The shard is not responsible for this account" in consumer.log()


# --- crash safety -----------------------------------------------------------------------------


def test_killed_consumer_loses_nothing_and_applies_nothing_twice(shard):
    count = 300
    blocked_change_id = 150
    creditor, other = shard.creditor(), random_id()
    for change_id in range(1, count + 1):
        shard.balance_change(creditor, other, change_id, 1)
    shard.start("workers", "flusher")
    environ = shard.environment()
    log_path = shard.log_dir / "consumer-killed.log"
    archived = "SELECT count(*) FROM registered_balance_change WHERE debtor_id = %s AND other_creditor_id = %s"

    # An uncommitted archive row of one change makes the consumer's batch wait on it
    # in the middle of its transaction: that is where it gets killed.
    with psycopg.connect(shard.database_url) as blocker:
        blocker.execute(
            "INSERT INTO pyswpt.registered_balance_change"
            " (debtor_id, other_creditor_id, change_id, committed_at, is_applied)"
            " VALUES (%s, %s, %s, now(), false)",
            (shard.debtor_id, other, blocked_change_id),
        )
        with process_group(["run", "consumer"], environ, log_path) as consumer:
            wait_for(lambda: consumer_waits_on_a_lock(shard), "the consumer to wait on the blocked change")
            committed_before_the_kill = shard.count(archived, shard.debtor_id, other)
            os.killpg(consumer.pid, signal.SIGKILL)
            consumer.wait(timeout=30)
        blocker.rollback()
    assert 0 < committed_before_the_kill < count

    with process_group(["run", "consumer"], environ, log_path):
        wait_for(lambda: shard.count(archived, shard.debtor_id, other) == count, "every change to be archived")
        shard.settle()

    assert shard.principal(creditor) == count
    applied = archived + " AND is_applied"
    assert shard.count(applied, shard.debtor_id, other) == count
    messages = shard.inbox.take(count + 1)  # the account's creation (B4), then one transfer per change
    transfers = [m.fields for m in messages if m.properties.type == "AccountTransfer"]
    assert sorted(t["transfer_number"] for t in transfers) == list(range(1, count + 1))
    shard.inbox.assert_empty()


def consumer_waits_on_a_lock(shard: Shard) -> bool:
    return (
        shard.count(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'pyswpt consumer%%' AND wait_event_type = 'Lock'"
        )
        > 0
    )


# --- accounts of another shard, through the fetch API ------------------------------------


@pytest.fixture
def other_shard_url(postgres_server_url) -> Iterator[str]:
    """The database of another shard (0.#), served by its own `pyswpt run web`."""
    with new_database(postgres_server_url, "pyswpt_test_other") as url:
        schema.apply_migrations(url)
        yield url


def configure_in(database_url: str, debtor_id: int, creditor_id: int, config_data: str = "") -> None:
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute(
            "SELECT pyswpt_api.configure_account(%s, %s, now(), 1, 0.0, 0, %s, 604800)",
            (debtor_id, creditor_id, config_data),
        )


def owned_by(realm: Realm, debtor_id: int) -> int:
    return next(c for c in iter(random_id, None) if realm.owns(debtor_id, c))


SHARD_ONE = Realm.from_binding_key("1.#")
SHARD_ZERO = Realm.from_binding_key("0.#")


def test_recipient_in_another_shard_is_checked_through_the_fetch_api(shard, other_shard_url, tmp_path):
    sender = shard.creditor(owned_by(SHARD_ONE, shard.debtor_id))
    present = shard.creditor(owned_by(SHARD_ZERO, shard.debtor_id))
    absent = shard.creditor(owned_by(SHARD_ZERO, shard.debtor_id))
    configure_in(other_shard_url, shard.debtor_id, present)  # only the other shard has it
    with web_server(other_shard_url, tmp_path, PROTOCOL_BROKER_QUEUE_ROUTING_KEY="0.#") as web:
        start_all(shard, PROTOCOL_BROKER_QUEUE_ROUTING_KEY="1.#", FETCH_API_URL=web.url("/"))
        open_account(shard, sender)
        since = now()
        to_absent = shard.prepare(sender, u64_string(absent), request_id=1, min_locked=0, max_locked=0)
        [rejected] = shard.inbox.take(1)
        to_present = shard.prepare(sender, u64_string(present), request_id=2, min_locked=0, max_locked=0)
        [prepared] = shard.inbox.take(1)

    assert_rejected_transfer(shard, rejected, to_absent, "RECIPIENT_IS_UNREACHABLE", 0, since)
    transfer_id = first_transfer_id(shard.account(sender)["creation_date"].isoformat())
    expected = prepared_transfer_fields(to_present, transfer_id, 0, present, since)
    assert_smp_message(prepared, "to_coordinators", hex_routing_key(sender), expected)


def test_new_account_gets_the_rate_of_a_root_account_in_another_shard(shard, other_shard_url, tmp_path):
    debtor_root_elsewhere = next(d for d in iter(random_id, None) if SHARD_ZERO.owns(d, 0))
    shard.debtor_id = debtor_root_elsewhere
    shard.inbox.bind("to_debtors", hex_routing_key(debtor_root_elsewhere))
    creditor = shard.creditor(owned_by(SHARD_ONE, debtor_root_elsewhere))
    configure_in(other_shard_url, debtor_root_elsewhere, 0, '{"rate": 3.5}')
    with web_server(other_shard_url, tmp_path, PROTOCOL_BROKER_QUEUE_ROUTING_KEY="0.#") as web:
        start_all(shard, PROTOCOL_BROKER_QUEUE_ROUTING_KEY="1.#", FETCH_API_URL=web.url("/"))
        since = now()
        config = shard.configure(creditor)
        created, initialised = shard.inbox.take(2)

    assert created.fields["interest_rate"] == 0.0
    expected = account_update_fields(
        shard,
        creditor,
        config,
        since,
        interest_rate=3.5,
        last_change_seqnum=2,
        last_interest_rate_change_ts=Recent(since),
    )
    assert_smp_message(initialised, "to_creditors", hex_routing_key(creditor), expected)
