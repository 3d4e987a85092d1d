"""`pyswpt run consumer --draining-mode` (consume_messages --draining-mode): retiring a parent's queue.

A child shard `0.#` drains its parent's queue: it applies its own messages,
hands the sibling's on to accounts_in (never parks them), keeps a message
that no queue would take, steps back from the idle queue so that
`delete-queue` can delete it, and exits with status 0 once it is gone.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid

import pika
import psycopg
import pytest
from broker import catching_queue, declare_smp_exchanges, queue_counts
from drivers import driver_environment, running, wait_for

from pyswpt import topology
from pyswpt.consuming import MAX_DRAINING_PERIOD_SECONDS, DrainingPauses
from pyswpt.sharding import Realm, binary_routing_key

CHILD_KEY = "0.#"
WAIT_SECONDS = 40.0  # the first pause of a draining consumer lasts up to 15 s


def test_a_pause_lasts_until_the_next_multiple_of_the_period_not_now_mod_the_period():
    pauses = DrainingPauses()

    # At 100 s past the epoch with P = 15 s the next multiple is 105 s; the reference slept 100 mod 15 = 10 s.
    assert pauses.next_pause_seconds(100.0) == 5.0
    assert pauses.next_pause_seconds(100.0) == 20.0  # P = 30 s now: until 120 s
    assert pauses.next_pause_seconds(120.0) == 60.0  # P = 60 s: a multiple is no reason to stay


def test_the_period_doubles_up_to_an_hour_and_allows_more_idle_polls_as_it_grows():
    pauses = DrainingPauses()
    polls = []
    for _ in range(12):
        polls.append(pauses.idle_polls_before_pause())
        pauses.next_pause_seconds(0.5)

    assert pauses.period_seconds == MAX_DRAINING_PERIOD_SECONDS
    assert polls[:4] == [1, 2, 4, 7]  # 1 + int(P / 20) for P = 15, 30, 60, 120


def pair_in(realm: Realm, debtor_id: int) -> tuple[int, int]:
    while not realm.owns(debtor_id, creditor_id := random.randint(1, 2**62)):
        pass
    return debtor_id, creditor_id


def configure_account(debtor_id: int, creditor_id: int) -> tuple[pika.BasicProperties, bytes]:
    fields = {
        "type": "ConfigureAccount",
        "debtor_id": debtor_id,
        "creditor_id": creditor_id,
        "negligible_amount": 0.0,
        "config_data": "",
        "config_flags": 0,
        "seqnum": 1,
        "ts": dt.datetime.now(dt.UTC).isoformat(),
    }
    properties = pika.BasicProperties(
        content_type="application/json", type="ConfigureAccount", delivery_mode=2, headers={"x-peer": "kept"}
    )
    return properties, json.dumps(fields).encode()


@pytest.fixture
def old_queue(rabbitmq_url):
    """A parent's queue, already unbound from accounts_in: it holds what arrived before the split."""
    declare_smp_exchanges(rabbitmq_url)
    queue = f"test_drained_{uuid.uuid4().hex[:8]}"
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_declare(queue, durable=True, arguments=topology.main_queue_arguments(queue))
    yield queue
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_delete(queue)


def put(rabbitmq_url: str, queue: str, message: tuple[pika.BasicProperties, bytes]) -> None:
    with topology.open_channel(rabbitmq_url) as channel:
        channel.confirm_delivery()
        channel.basic_publish("", queue, message[1], message[0])


def account_exists(database_url: str, debtor_id: int, creditor_id: int) -> bool:
    with psycopg.connect(database_url, autocommit=True) as conn:
        query = "SELECT count(*) FROM pyswpt.account WHERE debtor_id = %s AND creditor_id = %s"
        return conn.execute(query, (debtor_id, creditor_id)).fetchone()[0] == 1


def parked_count(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pyswpt.parked_message").fetchone()[0]


@pytest.mark.parametrize("threads", ["1", "3"])
def test_a_draining_child_applies_its_own_messages_and_hands_the_siblings_on_to_accounts_in(
    database_url, rabbitmq_url, old_queue, tmp_path, threads
):
    debtor_id = random.randint(1, 2**62)
    own = pair_in(Realm.from_binding_key("0.#"), debtor_id)
    sibling = pair_in(Realm.from_binding_key("1.#"), debtor_id)
    sibling_message = configure_account(*sibling)
    put(rabbitmq_url, old_queue, configure_account(*own))
    put(rabbitmq_url, old_queue, sibling_message)
    environ = driver_environment(
        database_url,
        rabbitmq_url,
        PROTOCOL_BROKER_QUEUE=old_queue,
        PROTOCOL_BROKER_QUEUE_ROUTING_KEY=CHILD_KEY,
        PROTOCOL_BROKER_PREFETCH_COUNT="10",
        PROTOCOL_BROKER_THREADS=threads,
    )
    # The sibling's queue: bound to the key of its account.
    with catching_queue(rabbitmq_url, [("accounts_in", binary_routing_key(*sibling))]) as sibling_queue:
        with running(["run", "consumer", "--draining-mode"], environ, tmp_path) as drainer:
            [handed_on] = sibling_queue.collect(1)
            wait_for(lambda: account_exists(database_url, *own), "the child's own account")

            assert handed_on.exchange == "accounts_in"
            assert handed_on.routing_key == binary_routing_key(*sibling)
            assert handed_on.body == sibling_message[1]
            assert handed_on.properties.type == "ConfigureAccount"
            assert handed_on.properties.headers["x-peer"] == "kept"
            assert not account_exists(database_url, *sibling)
            assert parked_count(database_url) == 0
            wait_for(lambda: queue_counts(rabbitmq_url, old_queue)[0] == 0, "the old queue to empty")

            # Idle, the drainer steps back, so delete-queue finds the queue unused and deletes it.
            assert topology.delete_queue(rabbitmq_url, old_queue, poll_seconds=0.2, max_attempts=200)
            wait_for(lambda: drainer.process.poll() is not None, "the drainer to exit", WAIT_SECONDS)
            assert drainer.process.returncode == 0, drainer.log()
            assert "draining is done" in drainer.log()


def test_a_siblings_message_that_no_queue_takes_stays_in_the_old_queue_and_is_not_parked(
    database_url, rabbitmq_url, old_queue, tmp_path
):
    debtor_id = random.randint(1, 2**62)
    sibling = pair_in(Realm.from_binding_key("1.#"), debtor_id)
    put(rabbitmq_url, old_queue, configure_account(*sibling))
    environ = driver_environment(
        database_url,
        rabbitmq_url,
        PROTOCOL_BROKER_QUEUE=old_queue,
        PROTOCOL_BROKER_QUEUE_ROUTING_KEY=CHILD_KEY,
    )
    with running(["run", "consumer", "--draining-mode"], environ, tmp_path) as drainer:
        wait_for(lambda: "Is the sibling shard's queue bound" in drainer.log(), "the returned hand-on")
        with catching_queue(rabbitmq_url, [("accounts_in", binary_routing_key(*sibling))]) as sibling_queue:
            # Handed back, the message comes again; once the sibling's queue is bound it gets it.
            [handed_on] = sibling_queue.collect(1, timeout_seconds=WAIT_SECONDS)
        assert handed_on.fields["creditor_id"] == sibling[1]
        assert parked_count(database_url) == 0
        drainer.assert_alive()


def test_a_draining_consumer_of_a_missing_queue_exits_with_status_0(database_url, rabbitmq_url, tmp_path):
    environ = driver_environment(
        database_url,
        rabbitmq_url,
        PROTOCOL_BROKER_QUEUE=f"test_gone_{uuid.uuid4().hex[:8]}",
        PROTOCOL_BROKER_QUEUE_ROUTING_KEY=CHILD_KEY,
    )
    with running(["run", "consumer", "--draining-mode"], environ, tmp_path) as drainer:
        wait_for(lambda: drainer.process.poll() is not None, "the drainer to exit")
        assert drainer.process.returncode == 0, drainer.log()
