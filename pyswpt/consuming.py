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

In draining mode (spec 01 §3.6, used to retire a queue after a shard split)
the consumer steps back whenever the queue has been idle for a while: it
cancels its subscription and subscribes again at the next multiple of a
period on the wall clock, so that every draining consumer of the queue, on
every machine, is away at the same moments and `pyswpt delete-queue` finds
the queue with no consumer and no message. When the queue is gone, the
draining consumer's work is done and it returns.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import pika
import pika.exceptions
import psycopg
from pika.adapters.blocking_connection import BlockingChannel

from pyswpt import amqp, db, metrics, processes
from pyswpt.backoff import Backoff
from pyswpt.transactions import describe_error, is_infrastructure_error
from pyswpt.upgrades import ApiUnavailable, ApiWait

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
# Upper bound of a batch when the prefetch count is 0 ("unlimited").
MAX_BATCH_SIZE = 1000
TRANSIENT_ERRORS = (psycopg.OperationalError, *amqp.CONNECTION_ERRORS)
NOT_FOUND = 404
# Draining mode: the period of the pauses starts here and doubles after each pause, up to a maximum.
FIRST_DRAINING_PERIOD_SECONDS = 15.0
MAX_DRAINING_PERIOD_SECONDS = 3600.0


@dataclasses.dataclass(frozen=True)
class Delivery:
    delivery_tag: int
    properties: pika.BasicProperties
    body: bytes
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False
    # When the consumer received it (time.monotonic()), for the consume-to-commit latency.
    received_at: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class BatchOutcome:
    """What to tell the broker: rejected tags go to the dead-letter queue, requeued ones come back."""

    acked: list[int] = dataclasses.field(default_factory=list)
    rejected: list[int] = dataclasses.field(default_factory=list)
    requeued: list[int] = dataclasses.field(default_factory=list)
    # For the metrics only: acked tags of messages ignored (chores of another shard), and
    # rejected tags of messages that could not be parked (only the dead-letter queue has them).
    ignored: list[int] = dataclasses.field(default_factory=list)
    not_parked: list[int] = dataclasses.field(default_factory=list)

    def outcome_of_each(self) -> dict[int, str]:
        """The outcome label of each tag (pyswpt_messages_consumed_total)."""
        return (
            dict.fromkeys(self.acked, "applied")
            | dict.fromkeys(self.ignored, "ignored")
            | dict.fromkeys(self.rejected, "parked")
            | dict.fromkeys(self.not_parked, "rejected")
            | dict.fromkeys(self.requeued, "redelivered")
        )


BatchHandler = Callable[[psycopg.Connection, list[Delivery]], BatchOutcome]


@dataclasses.dataclass(frozen=True)
class QueueSettings:
    broker_url: str
    queue: str
    prefetch_count: int
    prefetch_size: int
    api_wait_seconds: float
    draining: bool = False

    @property
    def max_batch_size(self) -> int:
        return self.prefetch_count if self.prefetch_count > 0 else MAX_BATCH_SIZE


def consume_in_threads(
    settings: QueueSettings,
    postgres_url: str,
    threads: int,
    handler_factory: Callable[[], BatchHandler],
    stopping: threading.Event,
) -> bool:
    """Run `threads` independent consumers (own connections each) until stopped or one fails.

    True when every one of them finished its work (draining: the queue is gone).
    """
    failures: list[BaseException] = []
    done: list[bool] = []

    def consume() -> None:
        try:
            done.append(consume_until_stopped(settings, postgres_url, handler_factory(), stopping))
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
    return len(done) == threads and all(done)


def consume_until_stopped(
    settings: QueueSettings, postgres_url: str, handler: BatchHandler, stopping: threading.Event
) -> bool:
    """Consume, reconnecting with backoff after a lost connection, until `stopping` is set.

    True when the work is finished instead (draining: the queue is gone).
    """
    backoff = Backoff()
    while not stopping.is_set():
        try:
            return consume_batches(settings, postgres_url, handler, stopping)
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
    return False


def consume_batches(
    settings: QueueSettings,
    postgres_url: str,
    handler: BatchHandler,
    stopping: threading.Event,
) -> bool:
    """Consume until stopped (False); in draining mode, subscribe again after each pause until the
    queue is gone (True)."""
    connection = amqp.connect(settings.broker_url)
    database = DatabaseSession(postgres_url, f"pyswpt consumer {settings.queue}")
    pauses = DrainingPauses() if settings.draining else None
    received: list[Delivery] = []

    def collect(_channel, method, properties, body) -> None:
        received.append(
            Delivery(method.delivery_tag, properties, body, method.exchange, method.routing_key, method.redelivered)
        )

    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_size=settings.prefetch_size, prefetch_count=settings.prefetch_count)
        while not stopping.is_set():
            consumer_tag = subscribe(channel, settings.queue, collect, draining=pauses is not None)
            if consumer_tag is None:
                return True
            batches = Batches(connection, channel, database, handler, settings, received)
            if not batches.consume(stopping, pauses):
                return False  # stopping: the batch in hand is not acked, so the broker delivers it again
            # Only a draining consumer gets here, idle. pika hands back what arrives
            # while it cancels; what it had already passed on is applied first,
            # since an unacknowledged message is not counted by delete-queue.
            channel.basic_cancel(consumer_tag)
            if received:
                continue
            pause_seconds = pauses.next_pause_seconds(time.time())
            logger.info("Draining %s: idle, away for %.1f s.", settings.queue, pause_seconds)
            sleep_answering_broker(connection, pause_seconds, stopping)
        return False
    finally:
        database.close()
        if connection.is_open:
            connection.close()


def subscribe(channel, queue: str, on_message, *, draining: bool) -> str | None:
    """Start consuming; the consumer tag, or None when a queue being drained is gone (its work is done)."""
    try:
        consumer_tag = channel.basic_consume(queue, on_message_callback=on_message)
    except pika.exceptions.ChannelClosedByBroker as error:
        if not draining or error.reply_code != NOT_FOUND:
            raise
        logger.info("The queue %s is gone: draining is done.", queue)
        return None
    logger.info("Consuming %s%s.", queue, " (draining)" if draining else "")
    return consumer_tag


@dataclasses.dataclass
class Batches:
    """One subscription's deliveries, applied batch by batch and settled after each commit."""

    connection: pika.BlockingConnection
    channel: BlockingChannel
    database: DatabaseSession
    handler: BatchHandler
    settings: QueueSettings
    received: list[Delivery]  # filled by the subscription's callback, in delivery-tag order

    def consume(self, stopping: threading.Event, pauses: DrainingPauses | None) -> bool:
        """Apply batches until stopped (False), or until idle long enough to pause when draining (True)."""
        max_batch_size = self.settings.max_batch_size
        # Messages handed back while nothing else passes would come straight back.
        requeue_backoff = Backoff()
        idle_polls = 0
        while not stopping.is_set():
            self.connection.process_data_events(time_limit=POLL_SECONDS)
            if not self.received:
                idle_polls += 1
                if pauses is not None and idle_polls > pauses.idle_polls_before_pause():
                    return True
                continue
            idle_polls = 0
            # Take what else has already arrived, so the batch fills the window.
            self.connection.process_data_events(time_limit=0)
            batch = self.received[:max_batch_size]
            del self.received[:max_batch_size]
            outcome = handle_until_applied(self.connection, self.database, self.handler, batch, self.settings, stopping)
            if outcome is None:
                return False
            count_window(self.settings.queue, batch, outcome, time.monotonic())
            if outcome.requeued and not outcome.acked:
                sleep_answering_broker(self.connection, requeue_backoff.next_pause(), stopping)
            settle(self.channel, outcome)
        return False


@dataclasses.dataclass
class DrainingPauses:
    """When a draining consumer steps back from its queue, and for how long (spec 01 §3.6)."""

    period_seconds: float = FIRST_DRAINING_PERIOD_SECONDS

    def idle_polls_before_pause(self) -> int:
        """Idle polls of POLL_SECONDS allowed before a pause: more, the longer the period."""
        return 1 + int(self.period_seconds / 20)

    def next_pause_seconds(self, now: float) -> float:
        """Seconds from `now` (Unix time) until the next multiple of the period; then the period doubles.

        The reference sleeps `now mod P` seconds instead (a quirk): a pause of
        random length, from nothing to a whole period, so the consumers of a
        queue come back at scattered moments and `delete_queue` may never
        find the queue without one. Waiting until the next multiple of P
        brings them all back at the same instant, and keeps them all away
        until then.
        """
        pause_seconds = self.period_seconds - now % self.period_seconds
        self.period_seconds = min(2 * self.period_seconds, MAX_DRAINING_PERIOD_SECONDS)
        return pause_seconds


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


def count_window(queue: str, batch: list[Delivery], outcome: BatchOutcome, committed_at: float) -> None:
    """The metrics of a window once it committed: each message's outcome, the window's size,
    and how long each message that committed waited for it."""
    outcomes = outcome.outcome_of_each()
    counts = collections.Counter(
        (metrics.message_type_label(delivery.properties.type), outcomes[delivery.delivery_tag])
        for delivery in batch
        if delivery.delivery_tag in outcomes
    )
    for (message_type, name), count in counts.items():
        metrics.MESSAGES_CONSUMED.labels(queue, message_type, name).inc(count)
    metrics.CONSUMER_WINDOW_MESSAGES.labels(queue).observe(len(batch))
    requeued = set(outcome.requeued)
    metrics.observe_each(
        metrics.CONSUME_TO_COMMIT_SECONDS,
        [queue],
        (committed_at - delivery.received_at for delivery in batch if delivery.delivery_tag not in requeued),
    )


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
