"""Chores end to end (spec 01 §3.6, §5; spec 02 §2.7-§2.10, §4.7): the producer's exact
messages, and `pyswpt run chores` applying them through the real broker.

Each test gets its own chores queue. Chores carry the real current time as
`ts` (the handlers ignore chores more than a day old), so accounts are
arranged relative to the real clock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from drivers import Running, driver_environment, running, wait_for
from factories import CONFIG_SCHEDULED_FOR_DELETION, STATUS_DELETED, insert_account
from psycopg.rows import dict_row

from pyswpt import amqp, topology
from pyswpt.chores import ChoresPublisher
from pyswpt.messages import CapitalizeInterest, ChangeInterestRate, Chore, TryToDeleteAccount, UpdateDebtorInfo

UTC = dt.UTC
DAY = dt.timedelta(days=1)
DEBTOR = -2
CREDITOR = 1099511627778
# Spec 01 §4.2: (-1, 1234) is in 0.#, not in 1.#; (1, 2) is in 1.#.
IN_0 = (-1, 1234)
IN_1 = (1, 2)
SHA256_LOWER = "ab" * 32


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


@pytest.fixture
def chores_queue(rabbitmq_url) -> Iterator[str]:
    name = f"test_chores_{uuid.uuid4().hex[:8]}"
    topology.declare_chores_queue(rabbitmq_url, name)
    yield name
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_delete(name)


def publish(rabbitmq_url: str, queue: str, *chores: Chore) -> None:
    publisher = ChoresPublisher(rabbitmq_url, queue)
    try:
        publisher.publish(list(chores))
    finally:
        publisher.close()


def publish_raw(rabbitmq_url: str, queue: str, body: bytes, content_type: str | None, message_type: str) -> None:
    with topology.open_channel(rabbitmq_url) as channel:
        channel.basic_publish(
            "", queue, body, pika.BasicProperties(content_type=content_type, type=message_type, delivery_mode=2)
        )


@contextlib.contextmanager
def chores_consumer(
    database_url: str, rabbitmq_url: str, queue: str, log_dir: Path, **settings: str
) -> Iterator[Running]:
    environ = driver_environment(
        database_url, rabbitmq_url, CHORES_BROKER_QUEUE=queue, CHORES_BROKER_PREFETCH_COUNT="10", **settings
    )
    with running(["run", "chores"], environ, log_dir) as consumer:
        yield consumer


def account(conn: psycopg.Connection, debtor_id: int, creditor_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT * FROM account WHERE (debtor_id, creditor_id) = (%s, %s)", (debtor_id, creditor_id)
        ).fetchone()


def count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def queue_length(rabbitmq_url: str, queue: str) -> int:
    with topology.open_channel(rabbitmq_url) as channel:
        return channel.queue_declare(queue, passive=True).method.message_count


# The producer ---------------------------------------------------------------------------------


def test_chore_goes_to_the_chores_queue_as_python_default_json(rabbitmq_url, chores_queue):
    ts = dt.datetime(2024, 5, 20, 10, 15, 30, 123456, tzinfo=UTC)
    publish(rabbitmq_url, chores_queue, ChangeInterestRate(DEBTOR, CREDITOR, 2.5, ts))
    with topology.open_channel(rabbitmq_url) as channel:
        method, properties, body = channel.basic_get(chores_queue, auto_ack=True)
    assert (method.exchange, method.routing_key) == ("", chores_queue)
    assert (properties.content_type, properties.type) == ("application/json", "ChangeInterestRate")
    assert (properties.delivery_mode, properties.app_id) == (2, "swpt_accounts")
    assert body == (
        b'{"type": "ChangeInterestRate", "debtor_id": -2, "creditor_id": 1099511627778,'
        b' "interest_rate": 2.5, "ts": "2024-05-20T10:15:30.123456+00:00"}'
    )


def test_chore_to_a_missing_queue_fails_to_publish(rabbitmq_url):
    with pytest.raises(amqp.PublishError):
        publish(rabbitmq_url, f"test_missing_{uuid.uuid4().hex[:8]}", CapitalizeInterest(DEBTOR, CREDITOR))


# The consumer ---------------------------------------------------------------------------------


def test_capitalize_interest_turns_accrued_interest_into_principal(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    insert_account(conn, DEBTOR, CREDITOR, now=now() - 365 * DAY, principal=1_000_000, interest_rate=10.0)
    publish(rabbitmq_url, chores_queue, CapitalizeInterest(DEBTOR, CREDITOR))
    with chores_consumer(database_url, rabbitmq_url, chores_queue, tmp_path):
        wait_for(lambda: account(conn, DEBTOR, CREDITOR)["principal"] != 1_000_000, "the capitalization")
    # 365 days at 10% a year (of 365.25 days): 99,928 of interest.
    assert 1_099_900 < account(conn, DEBTOR, CREDITOR)["principal"] <= 1_100_000
    transfer = conn.execute(
        "SELECT coordinator_type, acquired_amount FROM account_transfer_signal WHERE creditor_id = %s", (CREDITOR,)
    ).fetchone()
    assert transfer == ("interest", account(conn, DEBTOR, CREDITOR)["principal"] - 1_000_000)


def test_change_interest_rate_sets_the_new_rate(conn, database_url, rabbitmq_url, chores_queue, tmp_path):
    insert_account(conn, DEBTOR, CREDITOR)
    publish(rabbitmq_url, chores_queue, ChangeInterestRate(DEBTOR, CREDITOR, 2.5, now()))
    with chores_consumer(database_url, rabbitmq_url, chores_queue, tmp_path):
        wait_for(lambda: account(conn, DEBTOR, CREDITOR)["interest_rate"] == 2.5, "the rate change")
    assert count(conn, "account_update_signal") == 1


def test_update_debtor_info_accepts_a_lowercase_sha256_and_empty_strings(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    insert_account(conn, DEBTOR, CREDITOR, debtor_info_content_type="text/plain")
    publish(
        rabbitmq_url, chores_queue, UpdateDebtorInfo(DEBTOR, CREDITOR, "https://example.com/d", "", SHA256_LOWER, now())
    )
    with chores_consumer(database_url, rabbitmq_url, chores_queue, tmp_path):
        wait_for(lambda: account(conn, DEBTOR, CREDITOR)["debtor_info_sha256"] is not None, "the info update")
    updated = account(conn, DEBTOR, CREDITOR)
    assert bytes(updated["debtor_info_sha256"]) == bytes.fromhex(SHA256_LOWER)
    assert updated["debtor_info_iri"] == "https://example.com/d"
    assert updated["debtor_info_content_type"] is None


def test_try_to_delete_account_deletes_a_scheduled_empty_account(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    insert_account(conn, DEBTOR, CREDITOR, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    publish(rabbitmq_url, chores_queue, TryToDeleteAccount(DEBTOR, CREDITOR))
    with chores_consumer(database_url, rabbitmq_url, chores_queue, tmp_path):
        wait_for(lambda: account(conn, DEBTOR, CREDITOR)["status_flags"] & STATUS_DELETED, "the deletion")


def test_chore_for_an_account_of_another_shard_is_acked_and_ignored(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    insert_account(conn, *IN_0, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    insert_account(conn, *IN_1, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    publish(rabbitmq_url, chores_queue, TryToDeleteAccount(*IN_0), TryToDeleteAccount(*IN_1))
    with chores_consumer(
        database_url, rabbitmq_url, chores_queue, tmp_path, PROTOCOL_BROKER_QUEUE_ROUTING_KEY="1.#"
    ) as consumer:
        wait_for(lambda: account(conn, *IN_1)["status_flags"] & STATUS_DELETED, "the owned account's deletion")
        consumer.stop()
    # Stopped consumers leave unacked messages in the queue: none are left.
    assert queue_length(rabbitmq_url, chores_queue) == 0
    assert account(conn, *IN_0)["status_flags"] & STATUS_DELETED == 0


@pytest.mark.parametrize(
    ("body", "content_type", "message_type", "logged"),
    [
        (
            b'{"type": "TryToDeleteAccount", "debtor_id": 1, "creditor_id": 2}',
            "text/plain",
            "TryToDeleteAccount",
            'Unknown message content type: "text/plain"',
        ),
        (
            b'{"type": "TryToDeleteAccount", "debtor_id": 1, "creditor_id": 2}',
            "application/json",
            "Unknown",
            'Unknown message type: "Unknown"',
        ),
        (b"{not json", "application/json", "TryToDeleteAccount", "The message does not contain a valid JSON document."),
        (
            b'{"type": "UpdateDebtorInfo", "debtor_id": 1, "creditor_id": 2, "debtor_info_iri": "",'
            b' "debtor_info_content_type": "", "debtor_info_sha256": "XYZ", "ts": "2024-01-01T00:00:00Z"}',
            "application/json",
            "UpdateDebtorInfo",
            "Message validation error: {'debtor_info_sha256'",
        ),
    ],
    ids=["content-type", "type", "json", "schema"],
)
def test_bad_chore_is_parked_with_its_reason_and_the_next_one_applied(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path, body, content_type, message_type, logged
):
    insert_account(conn, *IN_1, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    publish_raw(rabbitmq_url, chores_queue, body, content_type, message_type)
    publish(rabbitmq_url, chores_queue, TryToDeleteAccount(*IN_1))
    with chores_consumer(database_url, rabbitmq_url, chores_queue, tmp_path) as consumer:
        wait_for(lambda: account(conn, *IN_1)["status_flags"] & STATUS_DELETED, "the good chore")
        wait_for(lambda: logged in consumer.log(), "the log line of the bad chore")
        consumer.stop()
    assert queue_length(rabbitmq_url, chores_queue) == 0
    # The chores queue has no dead-letter queue: the database copy is the only one.
    parked = conn.execute("SELECT source_name, reason_code, body FROM parked_message").fetchall()
    assert parked == [(chores_queue, "invalid", body)]
