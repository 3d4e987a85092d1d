"""The SMP consumer's window locks accounts at once only after everything in it that may wait.

A PrepareTransfer may lock its sender's account without waiting and keep it to the window's
commit (try_to_prepare_at_once, tests/sql/test_prepare_at_once.py), and so may the window's
last call for the senders of its FinalizeTransfers (finalize_at_once,
tests/sql/test_finalize_at_once.py); a ConfigureAccount waits for its account's lock. Were
those locks taken first, the window would wait while holding them, and a transaction waiting
for one of those accounts could close a cycle of waits.

The consumer counts what its windows did at once and what they left to the stages, and a
window applied one message at a time finalizes each FinalizeTransfer at once in its own
transaction: its intake, as a window's, leaves waking the stage to that last call.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
from collections.abc import Iterator

import pika
import psycopg
import pytest
from drivers import wait_for
from factories import failing_account_writes, insert_account
from prometheus_client import REGISTRY

from pyswpt import config, consuming, db, schema
from pyswpt.drivers.consumer import SmpBatchHandler

DEBTOR_ID = -2
SENDER_ID = 1099511627778
RECIPIENT_ID = 1099511627781
CONFIGURED_ID = 1099511627790
TS = dt.datetime.now(dt.UTC).isoformat()


def delivery(tag: int, fields: dict) -> consuming.Delivery:
    properties = pika.BasicProperties(content_type="application/json", type=fields["type"], delivery_mode=2)
    return consuming.Delivery(delivery_tag=tag, properties=properties, body=json.dumps(fields).encode())


PREPARE_TRANSFER = {
    "type": "PrepareTransfer",
    "debtor_id": DEBTOR_ID,
    "creditor_id": SENDER_ID,
    "coordinator_type": "direct",
    "coordinator_id": SENDER_ID,
    "coordinator_request_id": 1,
    "min_locked_amount": 100,
    "max_locked_amount": 100,
    "recipient": str(RECIPIENT_ID),
    "final_interest_rate_ts": "9999-12-31T23:59:59+00:00",
    "max_commit_delay": 2147483647,
    "ts": TS,
}
FINALIZE_TRANSFER = {
    "type": "FinalizeTransfer",
    "debtor_id": DEBTOR_ID,
    "creditor_id": SENDER_ID,
    "coordinator_type": "direct",
    "coordinator_id": SENDER_ID,
    "coordinator_request_id": 1,
    "committed_amount": 40,
    "transfer_note_format": "",
    "transfer_note": "",
    "ts": TS,
}
CONFIGURE_ACCOUNT = {
    "type": "ConfigureAccount",
    "debtor_id": DEBTOR_ID,
    "creditor_id": CONFIGURED_ID,
    "negligible_amount": 0.0,
    "config_data": "",
    "config_flags": 0,
    "seqnum": 1,
    "ts": TS,
}


@pytest.fixture
def owner(database_url: str) -> Iterator[psycopg.Connection]:
    with contextlib.closing(psycopg.connect(database_url, autocommit=True)) as connection:
        connection.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
        yield connection


@contextlib.contextmanager
def held(database_url: str, creditor_id: int) -> Iterator[None]:
    """The account locked by an open transaction of another session, as a worker holds it."""
    with psycopg.connect(database_url) as other:
        other.execute(
            "SELECT 1 FROM pyswpt.account WHERE debtor_id = %s AND creditor_id = %s FOR NO KEY UPDATE",
            (DEBTOR_ID, creditor_id),
        )
        try:
            yield
        finally:
            other.rollback()


def lock_waits(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]


def can_lock_at_once(conn: psycopg.Connection, creditor_id: int) -> bool:
    with conn.transaction():
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT 1 FROM pyswpt.account WHERE debtor_id = %s AND creditor_id = %s FOR NO KEY UPDATE NOWAIT",
                    (DEBTOR_ID, creditor_id),
                )
        except psycopg.errors.LockNotAvailable:
            return False
    return True


def accounts(owner: psycopg.Connection) -> None:
    for creditor_id, principal in ((SENDER_ID, 1000), (RECIPIENT_ID, 0), (CONFIGURED_ID, 0)):
        insert_account(owner, DEBTOR_ID, creditor_id, principal=principal)


def apply_while_the_configured_account_is_held(
    database_url: str, rabbitmq_url: str, owner: psycopg.Connection, window: list[consuming.Delivery]
) -> tuple[consuming.BatchOutcome, bool]:
    """The window's outcome, and whether the sender could be locked while the window waited."""
    handler = SmpBatchHandler(config.load({"POSTGRES_URL": database_url, "PROTOCOL_BROKER_URL": rabbitmq_url}))
    outcomes: list[consuming.BatchOutcome] = []
    with contextlib.closing(db.connect(database_url)) as consumer_conn:
        with held(database_url, CONFIGURED_ID):
            applying = threading.Thread(target=lambda: outcomes.append(handler(consumer_conn, window)))
            applying.start()
            wait_for(lambda: lock_waits(owner) > 0, "the window to wait for the configured account")
            sender_was_free = can_lock_at_once(owner, SENDER_ID)
        applying.join(timeout=30)
    assert not applying.is_alive()
    [outcome] = outcomes
    return outcome, sender_was_free


def test_a_window_waiting_for_an_account_holds_no_sender_of_its_prepare_transfers(database_url, rabbitmq_url, owner):
    accounts(owner)
    window = [delivery(1, PREPARE_TRANSFER), delivery(2, CONFIGURE_ACCOUNT)]

    outcome, sender_was_free = apply_while_the_configured_account_is_held(database_url, rabbitmq_url, owner, window)

    assert sender_was_free
    assert sorted(outcome.acked) == [1, 2]
    # Served in the window itself, after the ConfigureAccount.
    assert owner.execute("SELECT count(*) FROM transfer_request").fetchone()[0] == 0
    prepared = owner.execute("SELECT sender_creditor_id, locked_amount FROM prepared_transfer").fetchall()
    assert prepared == [(SENDER_ID, 100)]


def test_a_window_waiting_for_an_account_holds_no_sender_of_its_finalize_transfers(database_url, rabbitmq_url, owner):
    accounts(owner)
    owner.execute(
        "SELECT enqueue_transfer_request(%s, %s, 'direct', %s, 1, 100, 100, %s, 'infinity', 1000000, now(), true)",
        (DEBTOR_ID, SENDER_ID, SENDER_ID, RECIPIENT_ID),
    )
    owner.execute("SELECT process_transfer_requests(%s, %s, 86400)", (DEBTOR_ID, SENDER_ID))
    (transfer_id,) = owner.execute("SELECT transfer_id FROM prepared_transfer").fetchone()
    window = [delivery(1, FINALIZE_TRANSFER | {"transfer_id": transfer_id}), delivery(2, CONFIGURE_ACCOUNT)]

    outcome, sender_was_free = apply_while_the_configured_account_is_held(database_url, rabbitmq_url, owner, window)

    assert sender_was_free
    assert sorted(outcome.acked) == [1, 2]
    # Served at the window's end: nothing queued for the stage, the recipient credited.
    assert owner.execute("SELECT count(*) FROM finalization_request").fetchone()[0] == 0
    assert owner.execute("SELECT status_code FROM finalized_transfer_signal").fetchall() == [("OK",)]
    balances = owner.execute(
        "SELECT creditor_id, principal FROM account WHERE creditor_id IN (%s, %s) ORDER BY creditor_id",
        (SENDER_ID, RECIPIENT_ID),
    ).fetchall()
    assert balances == [(SENDER_ID, 960), (RECIPIENT_ID, 40)]


def at_once(step: str, outcome: str) -> float:
    labels = {"queue": config.load({}).protocol_broker_queue, "step": step, "outcome": outcome}
    return REGISTRY.get_sample_value("pyswpt_consumer_at_once_total", labels) or 0.0


def test_the_consumer_counts_what_its_windows_did_at_once_and_what_they_left(database_url, rabbitmq_url, owner):
    accounts(owner)
    handler = SmpBatchHandler(config.load({"POSTGRES_URL": database_url, "PROTOCOL_BROKER_URL": rabbitmq_url}))
    counts = [(step, outcome) for step in ("prepare", "finalize") for outcome in ("done", "left")]
    before = {count: at_once(*count) for count in counts}

    def counted() -> dict[tuple[str, str], float]:
        return {count: at_once(*count) - before[count] for count in counts if at_once(*count) != before[count]}

    with contextlib.closing(db.connect(database_url)) as consumer_conn:
        assert handler(consumer_conn, [delivery(1, PREPARE_TRANSFER)]).acked == [1]
        assert counted() == {("prepare", "done"): 1}
        (transfer_id,) = owner.execute("SELECT transfer_id FROM prepared_transfer").fetchone()
        with held(database_url, SENDER_ID):
            window = [
                delivery(2, PREPARE_TRANSFER | {"coordinator_request_id": 2}),
                delivery(3, FINALIZE_TRANSFER | {"transfer_id": transfer_id}),
            ]
            assert sorted(handler(consumer_conn, window).acked) == [2, 3]
        assert counted() == {("prepare", "done"): 1, ("prepare", "left"): 1, ("finalize", "left"): 1}
        # The stage's work, queued: the window left it alone.
        assert owner.execute("SELECT count(*) FROM transfer_request").fetchone()[0] == 1
        assert owner.execute("SELECT count(*) FROM finalization_request").fetchone()[0] == 1

        window = [delivery(4, FINALIZE_TRANSFER | {"transfer_id": transfer_id})]
        assert handler(consumer_conn, window).acked == [4]
    # The sender free again, its queued request finalized too.
    assert counted() == {count: 1 for count in counts}
    assert owner.execute("SELECT count(*) FROM finalization_request").fetchone()[0] == 0


def test_a_window_applied_one_message_at_a_time_finalizes_its_transfers_at_once(database_url, rabbitmq_url, owner):
    accounts(owner)
    handler = SmpBatchHandler(config.load({"POSTGRES_URL": database_url, "PROTOCOL_BROKER_URL": rabbitmq_url}))
    finalized_before = at_once("finalize", "done")
    with contextlib.closing(db.connect(database_url)) as consumer_conn:
        assert handler(consumer_conn, [delivery(1, PREPARE_TRANSFER)]).acked == [1]
        (transfer_id,) = owner.execute("SELECT transfer_id FROM prepared_transfer").fetchone()
        # The database refuses the ConfigureAccount, and so the window: its messages go one at a time.
        with failing_account_writes(owner, CONFIGURED_ID, "RAISE EXCEPTION 'refused for the test';"):
            window = [delivery(2, CONFIGURE_ACCOUNT), delivery(3, FINALIZE_TRANSFER | {"transfer_id": transfer_id})]
            outcome = handler(consumer_conn, window)
    assert (outcome.acked, outcome.rejected) == ([3], [2])
    assert owner.execute("SELECT count(*) FROM finalization_request").fetchone()[0] == 0
    assert owner.execute("SELECT status_code FROM finalized_transfer_signal").fetchall() == [("OK",)]
    assert at_once("finalize", "done") - finalized_before == 1
