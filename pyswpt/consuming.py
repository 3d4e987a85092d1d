"""The consuming loop shared by the SMP consumer and the chores consumer.

Deliveries are taken in batches — everything the broker has sent, up to the
prefetch window — and handed to a batch handler, which applies the good ones
in one database transaction and says which to reject. Acks are sent only
after that transaction committed. A lost broker or database connection
closes the channel without acking (the broker redelivers) and reconnects
with backoff; anything else ends the process loudly.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

import pika
import pika.exceptions
import psycopg

from pyswpt import amqp, db, processes

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
# Upper bound of a batch when the prefetch count is 0 ("unlimited").
MAX_BATCH_SIZE = 1000
RECONNECT_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
TRANSIENT_ERRORS = (psycopg.OperationalError, pika.exceptions.AMQPError, ConnectionError)


@dataclasses.dataclass(frozen=True)
class Delivery:
    delivery_tag: int
    properties: pika.BasicProperties
    body: bytes


@dataclasses.dataclass
class BatchOutcome:
    """What to tell the broker: rejected tags go to the dead-letter queue."""

    acked: list[int] = dataclasses.field(default_factory=list)
    rejected: list[int] = dataclasses.field(default_factory=list)


BatchHandler = Callable[[psycopg.Connection, list[Delivery]], BatchOutcome]


@dataclasses.dataclass(frozen=True)
class QueueSettings:
    broker_url: str
    queue: str
    prefetch_count: int
    prefetch_size: int

    @property
    def max_batch_size(self) -> int:
        return self.prefetch_count if self.prefetch_count > 0 else MAX_BATCH_SIZE


def consume_in_threads(
    settings: QueueSettings,
    postgres_url: str,
    threads: int,
    handler_factory: Callable[[], BatchHandler],
    stopping: threading.Event,
) -> None:
    """Run `threads` independent consumers (own connections each) until stopped or one fails."""
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            consume_until_stopped(settings, postgres_url, handler_factory(), stopping)
        except BaseException as error:  # noqa: BLE001 - reported by the parent thread
            logger.exception("Consumer thread failed.")
            failures.append(error)
            stopping.set()

    workers = [threading.Thread(target=consume, name=f"consumer-{n}") for n in range(threads)]
    for worker in workers:
        worker.start()
    processes.join_threads(workers)
    if failures:
        raise failures[0]


def consume_until_stopped(
    settings: QueueSettings, postgres_url: str, handler: BatchHandler, stopping: threading.Event
) -> None:
    """Consume, reconnecting with backoff after a lost connection, until `stopping` is set."""
    failures_in_a_row = 0
    while not stopping.is_set():
        try:
            consume_batches(settings, postgres_url, handler, stopping)
            return
        except TRANSIENT_ERRORS as error:
            pause = backoff_pause(failures_in_a_row)
            failures_in_a_row += 1
            logger.error(
                "Lost a connection while consuming %s (%s); unacknowledged messages will be "
                "redelivered. Reconnecting in %.0f s.",
                settings.queue,
                error,
                pause,
            )
            stopping.wait(pause)


def consume_batches(
    settings: QueueSettings,
    postgres_url: str,
    handler: BatchHandler,
    stopping: threading.Event,
) -> None:
    connection = amqp.connect(settings.broker_url)
    try:
        with db.connect(postgres_url, application_name=f"pyswpt consumer {settings.queue}") as conn:
            channel = connection.channel()
            channel.basic_qos(prefetch_size=settings.prefetch_size, prefetch_count=settings.prefetch_count)
            received: list[Delivery] = []
            channel.basic_consume(
                settings.queue,
                on_message_callback=lambda _ch, method, properties, body: received.append(
                    Delivery(method.delivery_tag, properties, body)
                ),
            )
            logger.info("Consuming %s.", settings.queue)
            while not stopping.is_set():
                connection.process_data_events(time_limit=POLL_SECONDS)
                if not received:
                    continue
                # Take what else has already arrived, so the batch fills the window.
                connection.process_data_events(time_limit=0)
                batch = received[: settings.max_batch_size]
                del received[: settings.max_batch_size]
                settle(channel, handler(conn, batch))
    finally:
        if connection.is_open:
            connection.close()


def settle(channel, outcome: BatchOutcome) -> None:
    """Reject first, then ack up to the highest accepted tag in one frame."""
    for tag in outcome.rejected:
        channel.basic_reject(tag, requeue=False)
    if outcome.acked:
        # Deliveries arrive in tag order and batches are taken from the front,
        # so every tag up to the highest acked one belongs to this batch.
        channel.basic_ack(max(outcome.acked), multiple=True)


def backoff_pause(attempt: int) -> float:
    return RECONNECT_BACKOFF_SECONDS[min(attempt, len(RECONNECT_BACKOFF_SECONDS) - 1)]
