"""The batch publisher waits for the broker's confirms, and no longer than that."""

from __future__ import annotations

import time
import uuid

import pika
from pika.adapters.utils import io_services_utils

from pyswpt import amqp, topology

BATCHES = 5
# Each wait used to last its whole 1 s poll slice: opening the publisher and
# every batch took a second, whatever the broker did.
WITHIN_SECONDS = 1.0


def test_publisher_opens_and_publishes_batches_as_fast_as_the_broker_confirms(rabbitmq_url):
    queue = f"test_amqp_{uuid.uuid4().hex[:10]}"
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_declare(queue)
    message = amqp.OutgoingMessage("", queue, b"{}", pika.BasicProperties(delivery_mode=2), mandatory=True)
    try:
        started = time.monotonic()
        publisher = amqp.BatchPublisher(rabbitmq_url)
        try:
            for _ in range(BATCHES):
                publisher.publish([message, message])
        finally:
            publisher.close()
        elapsed_seconds = time.monotonic() - started
        with topology.open_channel(rabbitmq_url) as channel:
            delivered = channel.queue_declare(queue, passive=True).method.message_count
    finally:
        with topology.open_channel(rabbitmq_url) as channel:
            channel.queue_delete(queue)

    assert delivered == 2 * BATCHES
    assert elapsed_seconds < WITHIN_SECONDS


def test_publisher_says_which_messages_of_a_batch_were_returned_or_nacked(rabbitmq_url):
    accepting = f"test_amqp_{uuid.uuid4().hex[:10]}"
    # A full queue that refuses new messages: the broker nacks what is published to it.
    refusing = f"test_amqp_{uuid.uuid4().hex[:10]}"
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_declare(accepting)
        channel.queue_declare(refusing, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})

    def message(routing_key: str, body: bytes) -> amqp.OutgoingMessage:
        return amqp.OutgoingMessage("", routing_key, body, pika.BasicProperties(delivery_mode=2), mandatory=True)

    unbound = f"test_amqp_missing_{uuid.uuid4().hex[:10]}"
    batch = [
        message(accepting, b"1"),
        message(unbound, b"same"),
        message(accepting, b"same"),
        message(refusing, b"3"),
        message(unbound, b"same"),
        message(accepting, b"4"),
    ]
    try:
        publisher = amqp.BatchPublisher(rabbitmq_url)
        try:
            outcomes = publisher.publish_each(batch)
        finally:
            publisher.close()
        with topology.open_channel(rabbitmq_url) as channel:
            delivered = channel.queue_declare(accepting, passive=True).method.message_count
    finally:
        with topology.open_channel(rabbitmq_url) as channel:
            channel.queue_delete(accepting)
            channel.queue_delete(refusing)

    confirmed, returned, nacked = amqp.Outcome.CONFIRMED, amqp.Outcome.RETURNED, amqp.Outcome.NACKED
    assert outcomes == [confirmed, returned, confirmed, nacked, returned, confirmed]
    assert delivered == 3


def test_a_batch_leaves_in_one_send_and_arrives_whole_and_in_order(rabbitmq_url, monkeypatch):
    queue = f"test_amqp_{uuid.uuid4().hex[:10]}"
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_declare(queue)
    batch = [
        amqp.OutgoingMessage("", queue, str(n).encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
        for n in range(30)
    ]
    # Counted where pika sends its buffered output: a syscall (and a TCP segment) each.
    sends = []
    send = io_services_utils._AsyncTransportBase._sigint_safe_send
    monkeypatch.setattr(
        io_services_utils._AsyncTransportBase,
        "_sigint_safe_send",
        staticmethod(lambda sock, data: sends.append(len(data)) or send(sock, data)),
    )
    try:
        publisher = amqp.BatchPublisher(rabbitmq_url)
        try:
            sends.clear()
            outcomes = publisher.publish_each(batch)
            batch_sends = len(sends)
        finally:
            publisher.close()
        with topology.open_channel(rabbitmq_url) as channel:
            bodies = [channel.basic_get(queue, auto_ack=True)[2] for _ in batch]
    finally:
        with topology.open_channel(rabbitmq_url) as channel:
            channel.queue_delete(queue)

    assert outcomes == [amqp.Outcome.CONFIRMED] * len(batch)
    assert bodies == [message.body for message in batch]
    # Three frames a message went out one send each; a partial send may split the batch once.
    assert batch_sends <= 2
