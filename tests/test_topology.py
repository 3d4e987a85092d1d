"""The broker objects of spec 01 §3.7, checked on a real RabbitMQ.

Exchanges are shared by every shard (and by the tests of a session), so tests
only re-declare them; queues get names unique to the test and are deleted after.
Exchanges and their bindings outlive a test but not a session: each session
works in a new, empty vhost of its own, so no binding left by an earlier run
hides the loss of one that `subscribe` should create.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker, UnroutableError

from pyswpt import sharding, topology

WAIT_SECONDS = 10.0
NOT_FOUND = 404
PRECONDITION_FAILED = 406


# The reference's argument table of the SMP queue, written out literally so
# that a change in pyswpt.topology cannot silently change what is tested.
def reference_main_queue_arguments(queue: str) -> dict[str, str]:
    return {
        "x-queue-type": "quorum",
        "overflow": "reject-publish",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{queue}.XQ",
    }


# Before rabbitmq-server#7846 (3.12, backported to late 3.11 releases) the
# broker dropped messages dead-lettered into a stream instead of storing them.
STREAM_DEAD_LETTERING_SINCE = (3, 12)

# Binary routing keys of spec 01 §3.3: (123, 456) starts with 0, (1, 2) with 1.
KEY_STARTING_WITH_0 = "0.0.0.0.1.0.0.0.0.1.0.0.0.1.0.0.0.0.1.1.0.1.0.0"
KEY_STARTING_WITH_1 = "1.1.1.1.0.0.0.0.0.0.0.1.0.1.0.0.1.1.0.0.0.1.0.0"


@pytest.fixture
def connection(rabbitmq_url: str) -> Iterator[pika.BlockingConnection]:
    with topology.open_connection(rabbitmq_url) as opened:
        yield opened


@pytest.fixture
def new_queue_name(rabbitmq_url: str) -> Iterator[Callable[[str], str]]:
    """Make queue names unique to this test; delete them (and their `.XQ`) afterwards."""
    names: list[str] = []

    def make(purpose: str) -> str:
        name = f"pyswpt_test_{purpose}_{uuid.uuid4().hex[:10]}"
        names.append(name)
        return name

    yield make
    with topology.open_channel(rabbitmq_url) as channel:
        for name in names:
            channel.queue_delete(name)
            channel.queue_delete(topology.dead_letter_queue_name(name))


def reply_code_of(connection: pika.BlockingConnection, action: Callable[[BlockingChannel], object]) -> int:
    """Run a broker call on its own channel; the AMQP reply code (200 when it succeeded)."""
    channel = connection.channel()
    try:
        action(channel)
    except ChannelClosedByBroker as error:
        return error.reply_code
    channel.close()
    return 200


def redeclare_code(connection: pika.BlockingConnection, queue: str, arguments: dict) -> int:
    """Reply code of declaring the durable queue again with these arguments."""
    return reply_code_of(connection, lambda ch: ch.queue_declare(queue, durable=True, arguments=arguments))


def confirming_channel(connection: pika.BlockingConnection) -> BlockingChannel:
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


def publish(
    channel: BlockingChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: dict[str, object] | None = None,
    *,
    mandatory: bool = False,
) -> None:
    channel.basic_publish(
        exchange,
        routing_key,
        body,
        pika.BasicProperties(delivery_mode=2, headers=headers),
        mandatory=mandatory,
    )


def next_delivery(channel: BlockingChannel, queue: str, *, auto_ack: bool) -> tuple:
    """The next message of the queue, waiting for it up to WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=auto_ack)
        if method is not None:
            return method, properties, body
        channel.connection.sleep(0.02)
    raise AssertionError(f"no message arrived in {queue!r} within {WAIT_SECONDS} s")


def next_body(channel: BlockingChannel, queue: str) -> bytes:
    """The next message of the queue, acknowledged."""
    return next_delivery(channel, queue, auto_ack=True)[2]


def assert_not_routed_before(channel: BlockingChannel, queue: str, marker: bytes) -> None:
    """Messages routed to one queue keep their order: if the marker, published
    last straight into the queue, is the next message, nothing published before
    it reached the queue."""
    publish(channel, "", queue, marker)
    assert next_body(channel, queue) == marker


def message_count(connection: pika.BlockingConnection, queue: str) -> int:
    channel = connection.channel()
    count = channel.queue_declare(queue, passive=True).method.message_count
    channel.close()
    return count


def declare_bound_test_queue(connection: pika.BlockingConnection, queue: str, exchange: str, routing_key: str) -> None:
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(queue, exchange, routing_key=routing_key)
    channel.close()


def random_id() -> int:
    """A coordinator id no other test is likely to bind a queue for."""
    return random.randint(sharding.MIN_INT64, sharding.MAX_INT64)


# --- exchanges and queues -----------------------------------------------------


@pytest.mark.parametrize(
    ("exchange", "exchange_type"),
    [
        ("accounts_in", "topic"),
        ("to_creditors", "topic"),
        ("to_debtors", "topic"),
        ("to_coordinators", "headers"),
    ],
)
def test_subscribe_declares_durable_exchanges_of_the_reference_types(
    rabbitmq_url, connection, new_queue_name, exchange, exchange_type
):
    topology.subscribe(rabbitmq_url, new_queue_name("exchanges"), "#")

    same = reply_code_of(connection, lambda ch: ch.exchange_declare(exchange, exchange_type, durable=True))
    # A passive declare does not compare types, so an active one is the check.
    other_type = reply_code_of(connection, lambda ch: ch.exchange_declare(exchange, "fanout", durable=True))
    not_durable = reply_code_of(connection, lambda ch: ch.exchange_declare(exchange, exchange_type, durable=False))
    assert (same, other_type, not_durable) == (200, PRECONDITION_FAILED, PRECONDITION_FAILED)


def test_main_queue_accepts_the_reference_argument_table(rabbitmq_url, connection, new_queue_name):
    queue = new_queue_name("args")
    topology.subscribe(rabbitmq_url, queue, "#")

    assert redeclare_code(connection, queue, reference_main_queue_arguments(queue)) == 200


def test_main_queue_argument_table_is_the_reference_one_with_literal_overflow():
    # RabbitMQ does not compare unknown arguments such as `overflow` on
    # re-declaration, so the literal key can only be checked on the table itself.
    assert topology.main_queue_arguments("q") == reference_main_queue_arguments("q")


@pytest.mark.parametrize(
    "change",
    [
        {"x-dead-letter-routing-key": "elsewhere.XQ"},
        {"x-overflow": "reject-publish"},
        {"x-queue-type": "classic"},
    ],
)
def test_main_queue_refuses_other_arguments(rabbitmq_url, connection, new_queue_name, change):
    queue = new_queue_name("args")
    topology.subscribe(rabbitmq_url, queue, "#")
    arguments = {**reference_main_queue_arguments(queue), **change}

    assert redeclare_code(connection, queue, arguments) == PRECONDITION_FAILED


def test_dead_letter_queue_is_a_durable_stream(rabbitmq_url, connection, new_queue_name):
    queue = new_queue_name("dlq")
    topology.subscribe(rabbitmq_url, queue, "#")
    stream = f"{queue}.XQ"

    same = redeclare_code(connection, stream, {"x-queue-type": "stream"})
    quorum = redeclare_code(connection, stream, {"x-queue-type": "quorum"})
    assert (same, quorum) == (200, PRECONDITION_FAILED)


def test_subscribe_twice_is_harmless_and_routes_once(rabbitmq_url, connection, new_queue_name):
    queue = new_queue_name("twice")
    topology.subscribe(rabbitmq_url, queue, "0.#")
    topology.subscribe(rabbitmq_url, queue, "0.#")

    channel = confirming_channel(connection)
    publish(channel, "accounts_in", KEY_STARTING_WITH_0, b"once")
    assert next_body(channel, queue) == b"once"
    assert_not_routed_before(channel, queue, b"marker")


# --- routing --------------------------------------------------------------------


def test_accounts_in_routes_a_matching_binary_key_to_the_shard_queue(rabbitmq_url, connection, new_queue_name):
    queue = new_queue_name("routing")
    topology.subscribe(rabbitmq_url, queue, "0.#")

    channel = confirming_channel(connection)
    publish(channel, "accounts_in", KEY_STARTING_WITH_0, b"(123, 456)")
    assert next_body(channel, queue) == b"(123, 456)"


def test_accounts_in_does_not_route_another_shards_key_to_the_shard_queue(rabbitmq_url, connection, new_queue_name):
    queue = new_queue_name("routing")
    topology.subscribe(rabbitmq_url, queue, "0.#")

    channel = confirming_channel(connection)
    publish(channel, "accounts_in", KEY_STARTING_WITH_1, b"(1, 2)")
    assert_not_routed_before(channel, queue, b"marker")


@pytest.mark.parametrize("coordinator_type", ["direct", "agent"])
def test_to_coordinators_forwards_creditor_side_coordinators_to_to_creditors(
    rabbitmq_url, connection, new_queue_name, coordinator_type
):
    topology.subscribe(rabbitmq_url, new_queue_name("smp"), "#")
    routing_key = sharding.hex_routing_key(random_id())
    creditors = new_queue_name("creditors")
    debtors = new_queue_name("debtors")
    declare_bound_test_queue(connection, creditors, "to_creditors", routing_key)
    declare_bound_test_queue(connection, debtors, "to_debtors", routing_key)

    channel = confirming_channel(connection)
    headers = {"coordinator-type": coordinator_type}
    publish(channel, "to_coordinators", routing_key, b"prepared", headers)
    assert next_body(channel, creditors) == b"prepared"
    assert_not_routed_before(channel, debtors, b"marker")


def test_to_coordinators_forwards_issuing_coordinators_to_to_debtors(rabbitmq_url, connection, new_queue_name):
    topology.subscribe(rabbitmq_url, new_queue_name("smp"), "#")
    routing_key = sharding.hex_routing_key(random_id())
    creditors = new_queue_name("creditors")
    debtors = new_queue_name("debtors")
    declare_bound_test_queue(connection, creditors, "to_creditors", routing_key)
    declare_bound_test_queue(connection, debtors, "to_debtors", routing_key)

    channel = confirming_channel(connection)
    publish(channel, "to_coordinators", routing_key, b"rejected", {"coordinator-type": "issuing"})
    assert next_body(channel, debtors) == b"rejected"
    assert_not_routed_before(channel, creditors, b"marker")


def test_to_coordinators_returns_a_mandatory_message_of_unknown_coordinator_type(
    rabbitmq_url, connection, new_queue_name
):
    topology.subscribe(rabbitmq_url, new_queue_name("smp"), "#")
    routing_key = sharding.hex_routing_key(random_id())
    declare_bound_test_queue(connection, new_queue_name("creditors"), "to_creditors", routing_key)

    channel = confirming_channel(connection)
    with pytest.raises(UnroutableError):
        headers = {"coordinator-type": "other"}
        publish(channel, "to_coordinators", routing_key, b"x", headers, mandatory=True)


def broker_version(connection: pika.BlockingConnection) -> tuple[int, ...]:
    version = connection._impl.server_properties["version"]
    text = version.decode() if isinstance(version, bytes) else version
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def test_rejected_message_is_dead_lettered_to_the_xq_stream(rabbitmq_url, connection, new_queue_name):
    if broker_version(connection) < STREAM_DEAD_LETTERING_SINCE:
        pytest.skip(
            f"RabbitMQ {broker_version(connection)} silently drops messages dead-lettered into a "
            "stream (fixed by rabbitmq-server#7846, in 3.12); the `.XQ` queue stays empty there"
        )
    queue = new_queue_name("reject")
    topology.subscribe(rabbitmq_url, queue, "#")
    channel = confirming_channel(connection)
    publish(channel, "", queue, b"malformed")

    method, _properties, _body = next_delivery(channel, queue, auto_ack=False)
    channel.basic_reject(method.delivery_tag, requeue=False)

    # A stream is read by a consumer with a prefetch limit, from an offset.
    reader = connection.channel()
    reader.basic_qos(prefetch_count=10)
    messages = reader.consume(f"{queue}.XQ", arguments={"x-stream-offset": "first"}, inactivity_timeout=WAIT_SECONDS)
    _method, _properties, body = next(messages)
    reader.cancel()
    assert body == b"malformed"


# --- chores queue, unsubscribe, delete_queue -------------------------------------


def test_chores_queue_is_quorum_without_dead_letter_settings(rabbitmq_url, connection, new_queue_name):
    chores = new_queue_name("chores")
    topology.declare_chores_queue(rabbitmq_url, chores)
    topology.declare_chores_queue(rabbitmq_url, chores)

    same = redeclare_code(connection, chores, {"x-queue-type": "quorum"})
    dead_lettered = redeclare_code(connection, chores, reference_main_queue_arguments(chores))
    assert (same, dead_lettered) == (200, PRECONDITION_FAILED)


def test_unsubscribe_deletes_the_chores_queue_and_keeps_the_smp_queue(rabbitmq_url, connection, new_queue_name):
    queue = new_queue_name("retired")
    chores = new_queue_name("retired_chores")
    topology.subscribe(rabbitmq_url, queue, "0.#")
    topology.declare_chores_queue(rabbitmq_url, chores)

    # Both brokers are one server here: the reference would delete `queue`.
    topology.unsubscribe(rabbitmq_url, queue, "0.#", rabbitmq_url, chores)

    assert reply_code_of(connection, lambda ch: ch.queue_declare(chores, passive=True)) == NOT_FOUND
    assert reply_code_of(connection, lambda ch: ch.queue_declare(queue, passive=True)) == 200


def test_unsubscribe_removes_the_accounts_in_binding(rabbitmq_url, connection, new_queue_name):
    queue = new_queue_name("retired")
    topology.subscribe(rabbitmq_url, queue, "0.#")

    topology.unsubscribe(rabbitmq_url, queue, "0.#", rabbitmq_url, new_queue_name("retired_chores"))

    channel = confirming_channel(connection)
    publish(channel, "accounts_in", KEY_STARTING_WITH_0, b"(123, 456)")
    assert_not_routed_before(channel, queue, b"marker")


def test_unsubscribe_twice_is_harmless(rabbitmq_url, new_queue_name):
    queue = new_queue_name("retired")
    chores = new_queue_name("retired_chores")
    topology.subscribe(rabbitmq_url, queue, "0.#")
    topology.declare_chores_queue(rabbitmq_url, chores)

    topology.unsubscribe(rabbitmq_url, queue, "0.#", rabbitmq_url, chores)
    topology.unsubscribe(rabbitmq_url, queue, "0.#", rabbitmq_url, chores)


def test_delete_queue_keeps_a_queue_that_still_has_messages(rabbitmq_url, connection, new_queue_name):
    queue = new_queue_name("draining")
    topology.subscribe(rabbitmq_url, queue, "0.#")
    publish(confirming_channel(connection), "", queue, b"unprocessed")

    deleted = topology.delete_queue(rabbitmq_url, queue, poll_seconds=0.01, max_attempts=3)

    assert deleted is False
    assert message_count(connection, queue) == 1


def test_delete_queue_waits_until_the_queue_is_empty_then_deletes_it(rabbitmq_url, connection, new_queue_name):
    queue = new_queue_name("draining")
    topology.subscribe(rabbitmq_url, queue, "0.#")
    channel = confirming_channel(connection)
    publish(channel, "", queue, b"unprocessed")
    outcome: list[bool] = []

    def delete() -> None:
        outcome.append(topology.delete_queue(rabbitmq_url, queue, poll_seconds=0.05))

    deleter = threading.Thread(target=delete, daemon=True)
    deleter.start()

    # Getting the message proves the queue was still there while it held it.
    assert next_body(channel, queue) == b"unprocessed"
    deleter.join(WAIT_SECONDS)

    assert outcome == [True]
    assert reply_code_of(connection, lambda ch: ch.queue_declare(queue, passive=True)) == NOT_FOUND


def test_delete_queue_of_a_missing_queue_is_done(rabbitmq_url, new_queue_name):
    assert topology.delete_queue(rabbitmq_url, new_queue_name("missing"), max_attempts=1) is True


def test_delete_queue_keeps_a_queue_whose_consumer_holds_an_unacknowledged_message(
    rabbitmq_url, connection, new_queue_name
):
    queue = new_queue_name("draining")
    topology.subscribe(rabbitmq_url, queue, "0.#")
    channel = confirming_channel(connection)
    publish(channel, "", queue, b"in the consumer's hands")
    held: list[bytes] = []
    channel.basic_consume(queue, on_message_callback=lambda _ch, _method, _props, body: held.append(body))
    deadline = time.monotonic() + WAIT_SECONDS
    while not held and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.05)
    assert held == [b"in the consumer's hands"]
    assert message_count(connection, queue) == 0  # an unacknowledged message is not counted

    deleted = topology.delete_queue(rabbitmq_url, queue, poll_seconds=0.01, max_attempts=3)

    assert deleted is False
    assert reply_code_of(connection, lambda ch: ch.queue_declare(queue, passive=True)) == 200
