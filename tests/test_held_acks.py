"""The consumer's acks (pyswpt.consuming.Settler): a window's ack is held a few milliseconds and goes
in one frame with those of the windows settled meanwhile, but never while it would cover half the
channel's prefetch count; rejections and hand-backs go at once. Seen from the broker: what a
channel closed before its ack went out hands back."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pika
import pytest
from broker import HAS_RABBITMQCTL, plain_queue, queue_counts, unacked_messages
from drivers import start_consumer_thread, wait_for

from pyswpt import consuming, topology
from pyswpt.consuming import BatchOutcome

PREFETCH_COUNT = 10
LONG_HOLD_SECONDS = 60.0


@pytest.fixture
def queue(rabbitmq_url: str) -> Iterator[str]:
    with plain_queue(rabbitmq_url, "test_held_acks") as name:
        yield name


def publish(rabbitmq_url: str, queue: str, count: int) -> None:
    with topology.open_channel(rabbitmq_url) as channel:
        for n in range(count):
            channel.basic_publish("", queue, b"message %d" % n)


def delivered(channel, queue: str, count: int) -> list[int]:
    """Take `count` messages from the queue without acking them; their delivery tags."""
    tags = []
    for _ in range(count):
        method, _properties, _body = channel.basic_get(queue, auto_ack=False)
        tags.append(method.delivery_tag)
    return tags


def counting_acks(channel, monkeypatch) -> list[tuple[int, bool]]:
    """The channel's basic_ack calls, each still sent to the broker: (tag, multiple)."""
    calls: list[tuple[int, bool]] = []
    send = channel.basic_ack

    def basic_ack(delivery_tag: int, multiple: bool = False) -> None:
        calls.append((delivery_tag, multiple))
        send(delivery_tag, multiple=multiple)

    monkeypatch.setattr(channel, "basic_ack", basic_ack)
    return calls


def test_the_acks_of_windows_settled_together_go_in_one_frame_once_due(rabbitmq_url, queue, monkeypatch):
    publish(rabbitmq_url, queue, 3)
    with topology.open_channel(rabbitmq_url) as channel:
        first, second, third = delivered(channel, queue, 3)
        acks = counting_acks(channel, monkeypatch)
        settler = consuming.Settler(channel, PREFETCH_COUNT)
        settler.settle(BatchOutcome(acked=[first]), up_to_highest=True)
        settler.settle(BatchOutcome(acked=[second, third]), up_to_highest=True)
        assert acks == []
        wait_for(lambda: settler.seconds_until_due() == 0.0, "the held ack to fall due")
        settler.send_due()
        assert acks == [(third, True)]
    assert queue_counts(rabbitmq_url, queue) == (0, 0)


def test_a_held_ack_is_not_sent_before_it_is_due(rabbitmq_url, queue, monkeypatch):
    # A hold far longer than the test: a test thread paused for a few milliseconds on a busy
    # machine must not see the ack fall due between the settle and the send_due.
    monkeypatch.setattr(consuming, "ACK_HOLD_SECONDS", LONG_HOLD_SECONDS)
    publish(rabbitmq_url, queue, 2)
    with topology.open_channel(rabbitmq_url) as channel:
        settler = consuming.Settler(channel, PREFETCH_COUNT)
        settler.settle(BatchOutcome(acked=delivered(channel, queue, 2)), up_to_highest=True)
        settler.send_due()
    # The channel closed with the ack held: the broker hands both messages back.
    assert queue_counts(rabbitmq_url, queue) == (2, 0)


@pytest.mark.parametrize(
    ("channel_prefetch_count", "window_sizes"),
    [
        (4, [2]),  # half the prefetch count
        (10, [1, 1, 1, 1, 1]),  # the fifth window brings the held ack to half of it
        (1, [1]),  # the reference's prefetch count: every ack at once
    ],
)
def test_an_ack_that_covers_half_the_prefetch_count_goes_at_once(
    rabbitmq_url, queue, channel_prefetch_count, window_sizes
):
    publish(rabbitmq_url, queue, sum(window_sizes))
    with topology.open_channel(rabbitmq_url) as channel:
        settler = consuming.Settler(channel, channel_prefetch_count)
        for size in window_sizes:
            settler.settle(BatchOutcome(acked=delivered(channel, queue, size)), up_to_highest=True)
    assert queue_counts(rabbitmq_url, queue) == (0, 0)


def test_rejections_hand_backs_and_acks_tag_by_tag_go_at_once(rabbitmq_url, queue):
    publish(rabbitmq_url, queue, 4)
    with topology.open_channel(rabbitmq_url) as channel:
        held, rejected, handed_back, newer = delivered(channel, queue, 4)
        settler = consuming.Settler(channel, PREFETCH_COUNT)
        settler.settle(BatchOutcome(acked=[held], rejected=[rejected], requeued=[handed_back]), up_to_highest=True)
        # A newer window settled while an older one is still applied is acked tag by tag.
        settler.settle(BatchOutcome(acked=[newer]), up_to_highest=False)
        # Handed back at once: the broker has it ready again while the channel is open.
        wait_for(lambda: queue_counts(rabbitmq_url, queue)[0] == 1, "the handed-back message to be ready")
    # The rejected one is gone (the queue has no dead-letter exchange), the newer one acked;
    # the held ack was never sent, so its message is back too.
    assert queue_counts(rabbitmq_url, queue) == (2, 0)


class Applied:
    """A batch handler that acks everything and counts it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def __call__(self, _conn, deliveries: list[consuming.Delivery]) -> BatchOutcome:
        with self.lock:
            self.count += len(deliveries)
        return BatchOutcome(acked=[delivery.delivery_tag for delivery in deliveries])


@pytest.mark.skipif(not HAS_RABBITMQCTL, reason="counting unacked messages needs rabbitmqctl")
@pytest.mark.parametrize("threads", [1, 3])
def test_a_running_consumer_sends_its_held_ack_when_due(rabbitmq_url, database_url, queue, threads):
    handler = Applied()
    stopping = threading.Event()
    thread, failures = start_consumer_thread(
        rabbitmq_url, database_url, queue, handler, stopping, threads=threads, prefetch_count=PREFETCH_COUNT
    )
    try:
        wait_for(lambda: queue_counts(rabbitmq_url, queue)[1] == 1, "the consumer to subscribe")
        # One message: its window's ack alone is far from half the prefetch count.
        with topology.open_channel(rabbitmq_url) as channel:
            channel.basic_publish("", queue, b"alone", pika.BasicProperties(delivery_mode=2))
        wait_for(lambda: handler.count == 1, "the message to be applied")
        # Acked while the consumer runs and nothing else arrives: the hold ended by itself.
        wait_for(lambda: unacked_messages(rabbitmq_url, queue) == 0, "the held ack to be sent")
    finally:
        stopping.set()
        thread.join()
    assert failures == []
    assert queue_counts(rabbitmq_url, queue) == (0, 0)
