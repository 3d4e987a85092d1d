"""A consumer process with several threads (spec 01 §3.6): one broker connection and channel for
the threads, which apply beside a thread that waits but one at a time while each window is done
quickly, and acks that never cover a batch still being applied."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pika
import pytest
from broker import plain_queue, queue_counts, ready_messages
from drivers import start_consumer_thread, wait_for
from prometheus_client import REGISTRY

from pyswpt import consuming, topology

PREFETCH_COUNT = 10
THREADS = 3
SLOW = b"slow"
HANDLER_WAIT_SECONDS = 30.0
# How long the handler of test_quick_windows_are_applied_one_at_a_time takes for a window.
QUICK_WINDOW_SECONDS = 0.05


class SlowFirst:
    """Batch handlers sharing one log: a batch holding SLOW waits for `release`, then fails (with
    `fail`) or is acked; the others are acked at once."""

    def __init__(self, *, fail: bool) -> None:
        self.fail = fail
        self.lock = threading.Lock()
        self.acked_bodies: list[bytes] = []
        self.slow_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, _conn, deliveries: list[consuming.Delivery]) -> consuming.BatchOutcome:
        if any(delivery.body == SLOW for delivery in deliveries):
            self.slow_started.set()
            self.release.wait(HANDLER_WAIT_SECONDS)
            if self.fail:
                raise RuntimeError("the slow batch fails, and its consumer with it")
        with self.lock:
            self.acked_bodies.extend(delivery.body for delivery in deliveries)
        return consuming.BatchOutcome(acked=[delivery.delivery_tag for delivery in deliveries])

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked_bodies)


class Overlaps:
    """A batch handler that takes QUICK_WINDOW_SECONDS a batch, and counts the batches it applies at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.applying = 0
        self.most_at_once = 0
        self.acked = 0

    def __call__(self, _conn, deliveries: list[consuming.Delivery]) -> consuming.BatchOutcome:
        with self.lock:
            self.applying += 1
            self.most_at_once = max(self.most_at_once, self.applying)
        time.sleep(QUICK_WINDOW_SECONDS)  # the window's work, long enough for others to start beside it
        with self.lock:
            self.applying -= 1
            self.acked += len(deliveries)
        return consuming.BatchOutcome(acked=[delivery.delivery_tag for delivery in deliveries])

    def acked_count(self) -> int:
        with self.lock:
            return self.acked


@pytest.fixture
def queue(rabbitmq_url: str) -> Iterator[str]:
    with plain_queue(rabbitmq_url, "test_consumer_threads") as name:
        yield name


def publish(rabbitmq_url: str, queue: str, bodies: list[bytes]) -> None:
    with topology.open_channel(rabbitmq_url) as channel:
        for body in bodies:
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))


def slow_windows(queue: str) -> float:
    return REGISTRY.get_sample_value("pyswpt_consumer_slow_windows_total", {"queue": queue}) or 0.0


def test_the_threads_share_one_subscription_and_apply_beside_a_batch_that_waits(rabbitmq_url, database_url, queue):
    handler = SlowFirst(fail=False)
    stopping = threading.Event()
    thread, failures = start_consumer_thread(
        rabbitmq_url, database_url, queue, handler, stopping, threads=THREADS, prefetch_count=PREFETCH_COUNT
    )
    # Two windows and a few: the few are held back for a busy thread, HOLD_BACK_SECONDS at most.
    fast = [b"fast %d" % n for n in range(2 * PREFETCH_COUNT + 3)]
    try:
        publish(rabbitmq_url, queue, [SLOW])
        wait_for(handler.slow_started.is_set, "the slow batch to be applied")
        publish(rabbitmq_url, queue, fast)
        # While one thread waits, the others apply the rest, a few at a time as they come.
        wait_for(lambda: handler.acked_count() == len(fast), "the other threads to apply the rest")
        # One subscription for the process, as the reference has, not one per thread.
        assert queue_counts(rabbitmq_url, queue) == (0, 1)
        # The slow window, applied alone, outlasted the hold-back; what came behind it did not wait for it.
        assert slow_windows(queue) >= 1
        handler.release.set()
        wait_for(lambda: handler.acked_count() == len(fast) + 1, "the slow batch to be applied")
    finally:
        stopping.set()
        handler.release.set()
        thread.join()
    assert failures == []
    assert sorted(handler.acked_bodies) == sorted([SLOW, *fast])
    assert queue_counts(rabbitmq_url, queue) == (0, 0)


def test_quick_windows_are_applied_one_at_a_time(rabbitmq_url, database_url, queue, monkeypatch):
    # Far longer than a window takes: every window is done before its hold-back ends.
    monkeypatch.setattr(consuming, "HOLD_BACK_SECONDS", HANDLER_WAIT_SECONDS)
    bodies = [b"message %d" % n for n in range(4 * THREADS * PREFETCH_COUNT)]
    # Queued first, so that the broker sends a window for every thread at once.
    publish(rabbitmq_url, queue, bodies)
    handler = Overlaps()
    stopping = threading.Event()
    thread, failures = start_consumer_thread(
        rabbitmq_url, database_url, queue, handler, stopping, threads=THREADS, prefetch_count=PREFETCH_COUNT
    )
    try:
        wait_for(lambda: handler.acked_count() == len(bodies), "every message to be applied")
    finally:
        stopping.set()
        thread.join()
    assert failures == []
    # Full windows waited while each was applied; a thread took the next once the last was done.
    assert handler.most_at_once == 1
    assert slow_windows(queue) == 0
    assert queue_counts(rabbitmq_url, queue) == (0, 0)


def test_an_ack_never_covers_an_older_batch_still_being_applied(rabbitmq_url, database_url, queue):
    handler = SlowFirst(fail=True)
    stopping = threading.Event()
    thread, failures = start_consumer_thread(
        rabbitmq_url, database_url, queue, handler, stopping, threads=THREADS, prefetch_count=PREFETCH_COUNT
    )
    try:
        publish(rabbitmq_url, queue, [SLOW])
        wait_for(handler.slow_started.is_set, "the slow batch to be applied")
        publish(rabbitmq_url, queue, [b"fast %d" % n for n in range(PREFETCH_COUNT - 1)])
        # Newer batches, applied and acked while the slow one is still in hand.
        wait_for(lambda: handler.acked_count() >= PREFETCH_COUNT // THREADS, "a newer batch to be applied")
        with handler.lock:
            acked = set(handler.acked_bodies)
    finally:
        handler.release.set()
        thread.join(HANDLER_WAIT_SECONDS)
        stopping.set()
    assert [type(failure) for failure in failures] == [RuntimeError]

    # The failed consumer's connection is gone: what it had not acked is back in the queue.
    # An ack of every tag up to a newer batch's highest would have taken the slow one too.
    back = [body for _properties, body in ready_messages(rabbitmq_url, queue)]
    assert SLOW in back
    assert not acked & set(back)
