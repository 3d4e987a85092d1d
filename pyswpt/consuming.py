"""The consuming loop shared by the SMP consumer and the chores consumer.

Deliveries are taken in batches — everything the broker has sent, up to the
prefetch window — and handed to a batch handler, which applies them (see
pyswpt.applying) and says which to ack, reject or hand back. Acks are sent
only after the transaction that applied the messages committed. When the
database is unavailable the same batch is retried with backoff on a new
database connection, the broker channel kept, so an outage does not count
as a delivery attempt of every message. So does a missing or changed SQL
function while an upgrade runs, up to APP_API_WAIT_SECONDS (pyswpt.upgrades).
A lost broker connection reconnects with backoff (unacknowledged messages
are redelivered); anything else ends the process loudly.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import pika
import psycopg

from pyswpt import amqp, db, processes
from pyswpt.backoff import Backoff
from pyswpt.transactions import describe_error, is_infrastructure_error
from pyswpt.upgrades import ApiUnavailable, ApiWait

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
# Upper bound of a batch when the prefetch count is 0 ("unlimited").
MAX_BATCH_SIZE = 1000
TRANSIENT_ERRORS = (psycopg.OperationalError, *amqp.CONNECTION_ERRORS)


@dataclasses.dataclass(frozen=True)
class Delivery:
    delivery_tag: int
    properties: pika.BasicProperties
    body: bytes
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False


@dataclasses.dataclass
class BatchOutcome:
    """What to tell the broker: rejected tags go to the dead-letter queue, requeued ones come back."""

    acked: list[int] = dataclasses.field(default_factory=list)
    rejected: list[int] = dataclasses.field(default_factory=list)
    requeued: list[int] = dataclasses.field(default_factory=list)


BatchHandler = Callable[[psycopg.Connection, list[Delivery]], BatchOutcome]


@dataclasses.dataclass(frozen=True)
class QueueSettings:
    broker_url: str
    queue: str
    prefetch_count: int
    prefetch_size: int
    api_wait_seconds: float

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
        except ApiUnavailable as error:  # its one line is logged where the process exits
            failures.append(error)
            stopping.set()
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
    backoff = Backoff()
    while not stopping.is_set():
        try:
            consume_batches(settings, postgres_url, handler, stopping)
            return
        except TRANSIENT_ERRORS as error:
            pause = backoff.next_pause()
            logger.error(
                "Lost a connection while consuming %s (%s); unacknowledged messages will be "
                "redelivered. Reconnecting in %.0f s.",
                settings.queue,
                describe_error(error),
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
    database = DatabaseSession(postgres_url, f"pyswpt consumer {settings.queue}")
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_size=settings.prefetch_size, prefetch_count=settings.prefetch_count)
        received: list[Delivery] = []
        channel.basic_consume(
            settings.queue,
            on_message_callback=lambda _ch, method, properties, body: received.append(
                Delivery(
                    method.delivery_tag,
                    properties,
                    body,
                    method.exchange,
                    method.routing_key,
                    method.redelivered,
                )
            ),
        )
        logger.info("Consuming %s.", settings.queue)
        # Messages handed back while nothing else passes would come straight back.
        requeue_backoff = Backoff()
        while not stopping.is_set():
            connection.process_data_events(time_limit=POLL_SECONDS)
            if not received:
                continue
            # Take what else has already arrived, so the batch fills the window.
            connection.process_data_events(time_limit=0)
            batch = received[: settings.max_batch_size]
            del received[: settings.max_batch_size]
            outcome = handle_until_applied(connection, database, handler, batch, settings, stopping)
            if outcome is None:
                return  # stopping: the batch is not acked, so the broker delivers it again
            if outcome.requeued and not outcome.acked:
                sleep_answering_broker(connection, requeue_backoff.next_pause(), stopping)
            settle(channel, outcome)
    finally:
        database.close()
        if connection.is_open:
            connection.close()


def handle_until_applied(
    connection: pika.BlockingConnection,
    database: DatabaseSession,
    handler: BatchHandler,
    batch: list[Delivery],
    settings: QueueSettings,
    stopping: threading.Event,
) -> BatchOutcome | None:
    """The handler's outcome for `batch`, retried while the database or its SQL API is unavailable;
    None if stopped. Raises ApiUnavailable when the API stays missing too long."""
    backoff = Backoff()
    api_wait = ApiWait(settings.api_wait_seconds, f"the consumer of {settings.queue}")
    while not stopping.is_set():
        try:
            return handler(database.connection(), batch)
        except Exception as error:
            if not is_infrastructure_error(error):
                raise
            api_wait.failed(error)
            pause = backoff.next_pause()
            logger.error(
                "The database is unavailable while applying %d messages from %s (%s); retrying in %.0f s.",
                len(batch),
                settings.queue,
                describe_error(error),
                pause,
            )
            database.close()
            sleep_answering_broker(connection, pause, stopping)
    return None


def sleep_answering_broker(connection: pika.BlockingConnection, seconds: float, stopping: threading.Event) -> None:
    """Wait `seconds` (less if stopping) while answering broker heartbeats."""
    deadline = time.monotonic() + seconds
    while not stopping.is_set() and (remaining := deadline - time.monotonic()) > 0:
        connection.sleep(min(remaining, POLL_SECONDS))


class DatabaseSession:
    """The consumer's database connection, opened when needed and replaced after a failure."""

    def __init__(self, url: str, application_name: str):
        self.url = url
        self.application_name = application_name
        self._conn: psycopg.Connection | None = None

    def connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.url, application_name=self.application_name)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def settle(channel, outcome: BatchOutcome) -> None:
    """Reject and hand back first, then ack up to the highest accepted tag in one frame."""
    for tag in outcome.rejected:
        channel.basic_reject(tag, requeue=False)
    for tag in outcome.requeued:
        channel.basic_nack(tag, multiple=False, requeue=True)
    if outcome.acked:
        # Deliveries arrive in tag order and batches are taken from the front,
        # so every tag up to the highest acked one belongs to this batch.
        channel.basic_ack(max(outcome.acked), multiple=True)
