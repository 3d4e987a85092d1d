"""The consuming loop shared by the SMP consumer and the chores consumer.

Each process has one broker connection and channel (spec 01 §3.6) and
*_BROKER_THREADS threads that apply what it received. Deliveries are taken in
batches (windows) — everything the broker has sent, up to the prefetch count —
and handed to a batch handler, which applies them (see pyswpt.applying) and
says which to ack, reject or hand back. The channel's prefetch count is the
setting times the threads: each thread has a window's worth in flight, as when
each had a subscription of its own. Acks are sent only after the transaction
that applied the messages committed, and only by the connection's thread
(pika's connections are not thread-safe); a window's ack waits a few
milliseconds to go with the next windows' (Settler). When the database is
unavailable the same batch is retried with backoff on a new database
connection, the broker channel kept, so an outage does not count as a
delivery attempt of every message. So does a missing or changed SQL function
while an upgrade runs, up to APP_API_WAIT_SECONDS (pyswpt.upgrades). A lost
broker connection reconnects with backoff (unacknowledged messages are
redelivered); anything else ends the process loudly.

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
import queue
import threading
import time
import typing
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
# How long the connection's thread waits for a window applied alone before it reads on, and
# deliveries for a busy applier thread (AppliersInThreads): about the time a window takes to apply.
HOLD_BACK_SECONDS = 0.02
# How long the ack of a settled window may wait for those of the next windows (Settler).
ACK_HOLD_SECONDS = 0.005
# basic.qos takes the prefetch count as a 16-bit number.
MAX_PREFETCH_COUNT = 2**16 - 1
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
    """Consume on one broker connection, applying batches in `threads` threads (a handler of
    `handler_factory` and a database connection each), until stopped or failed.

    True when the work is finished instead (draining: the queue is gone).
    """
    failures: list[BaseException] = []
    done: list[bool] = []

    def consume() -> None:
        try:
            handlers = [handler_factory() for _ in range(threads)]
            done.append(consume_until_stopped(settings, postgres_url, handlers, stopping))
        except ApiUnavailable as error:  # its one line is logged where the process exits
            failures.append(error)
            stopping.set()
        except BaseException as error:  # noqa: BLE001 - reported by the parent thread
            logger.exception("Consumer thread failed.")
            failures.append(error)
            stopping.set()

    consumer = threading.Thread(target=consume, name="consumer")
    consumer.start()
    processes.join_threads([consumer])
    if failures:
        raise failures[0]
    return done == [True]


def consume_until_stopped(
    settings: QueueSettings, postgres_url: str, handlers: list[BatchHandler], stopping: threading.Event
) -> bool:
    """Consume with a thread per handler, reconnecting with backoff after a lost connection, until `stopping` is set.

    True when the work is finished instead (draining: the queue is gone).
    """
    backoff = Backoff()
    while not stopping.is_set():
        try:
            return consume_batches(settings, postgres_url, handlers, stopping)
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
    settings: QueueSettings, postgres_url: str, handlers: list[BatchHandler], stopping: threading.Event
) -> bool:
    """Consume until stopped (False); in draining mode, subscribe again after each pause until the
    queue is gone (True)."""
    connection = amqp.connect(settings.broker_url)
    pauses = DrainingPauses() if settings.draining else None
    received: list[Delivery] = []

    def collect(_channel, method, properties, body) -> None:
        received.append(
            Delivery(method.delivery_tag, properties, body, method.exchange, method.routing_key, method.redelivered)
        )

    appliers: Appliers | None = None
    try:
        channel = connection.channel()
        # A window's worth for each thread; a window holds at most the prefetch count (Batches).
        prefetch_count = min(settings.prefetch_count * len(handlers), MAX_PREFETCH_COUNT)
        channel.basic_qos(prefetch_size=settings.prefetch_size, prefetch_count=prefetch_count)
        settler = Settler(channel, prefetch_count)
        appliers = (
            AppliersInLine(connection, settler, settings, postgres_url, handlers[0], stopping)
            if len(handlers) == 1
            else AppliersInThreads(connection, settler, settings, postgres_url, handlers)
        )
        while not stopping.is_set():
            consumer_tag = subscribe(channel, settings.queue, collect, draining=pauses is not None)
            if consumer_tag is None:
                return True
            batches = Batches(connection, appliers, settler, settings, received)
            if not batches.consume(stopping, pauses):
                return False  # stopping: a batch not applied yet is not acked, so the broker delivers it again
            # Only a draining consumer gets here, idle. pika hands back what arrives
            # while it cancels; what it had already passed on is applied first,
            # since an unacknowledged message is not counted by delete-queue.
            settler.send_held()
            channel.basic_cancel(consumer_tag)
            if received:
                continue
            pause_seconds = pauses.next_pause_seconds(time.time())
            logger.info("Draining %s: idle, away for %.1f s.", settings.queue, pause_seconds)
            sleep_answering_broker(connection, pause_seconds, stopping)
        return False
    finally:
        try:
            if appliers is not None:
                appliers.close()
        finally:
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
    """One subscription's deliveries, cut into batches for the appliers, in delivery-tag order."""

    connection: pika.BlockingConnection
    appliers: Appliers
    settler: Settler
    settings: QueueSettings
    received: list[Delivery]  # filled by the subscription's callback, in delivery-tag order

    def consume(self, stopping: threading.Event, pauses: DrainingPauses | None) -> bool:
        """Apply batches until stopped (False), or until idle long enough to pause when draining (True)."""
        max_batch_size = self.settings.max_batch_size
        idle_polls = 0
        while not stopping.is_set():
            # Returns early when a delivery or an applier's outcome arrives.
            self.connection.process_data_events(
                time_limit=min(self.appliers.look_again_in(self.received), self.settler.seconds_until_due())
            )
            settled = self.appliers.settle_applied()
            self.settler.send_due()
            if not self.received:
                if not settled and self.appliers.idle():
                    idle_polls += 1
                    if pauses is not None and idle_polls > pauses.idle_polls_before_pause():
                        return True
                continue
            idle_polls = 0
            # Take what else has already arrived, so the batch fills the window.
            self.connection.process_data_events(time_limit=0)
            while self.received and self.appliers.can_take(self.received):
                batch = self.received[:max_batch_size]
                del self.received[:max_batch_size]
                if not self.appliers.take(batch):
                    return False
        return False


class Appliers(typing.Protocol):
    """Who applies the batches of a subscription, and settles their deliveries once applied."""

    def can_take(self, waiting: list[Delivery]) -> bool:
        """Whether to hand on a batch now, `waiting` being the deliveries not handed on yet."""

    def take(self, batch: list[Delivery]) -> bool:
        """Apply `batch` or start applying it; False when stopped before it was applied."""

    def look_again_in(self, waiting: list[Delivery]) -> float:
        """Seconds until `waiting` may be handed on if nothing else happens (at most POLL_SECONDS)."""

    def settle_applied(self) -> int:
        """Settle the batches applied since the last call; how many. Raises what an applier raised."""

    def idle(self) -> bool:
        """No batch is being applied."""

    def close(self) -> None:
        """Settle what is being applied, once applied, and close the database connections."""


class AppliersInLine:
    """One thread: the connection's own applies each batch and settles it before it reads on."""

    def __init__(
        self,
        connection: pika.BlockingConnection,
        settler: Settler,
        settings: QueueSettings,
        postgres_url: str,
        handler: BatchHandler,
        stopping: threading.Event,
    ) -> None:
        self.connection = connection
        self.settler = settler
        self.settings = settings
        self.database = DatabaseSession(postgres_url, f"pyswpt consumer {settings.queue}")
        self.handler = handler
        self.stopping = stopping
        # Messages handed back while nothing else passes would come straight back.
        self.requeue_backoff = Backoff()

    def can_take(self, waiting: list[Delivery]) -> bool:
        return True

    def take(self, batch: list[Delivery]) -> bool:
        def sleep(seconds: float) -> None:
            sleep_answering_broker(self.connection, seconds, self.stopping)

        outcome = handle_until_applied(self.database, self.handler, batch, self.settings, self.stopping, sleep)
        if outcome is None:
            return False
        count_window(self.settings.queue, batch, outcome, time.monotonic())
        if outcome.requeued and not outcome.acked:
            self.settler.send_held()  # not kept waiting through the pause
            sleep(self.requeue_backoff.next_pause())
        self.settler.settle(outcome, up_to_highest=True)
        return True

    def look_again_in(self, waiting: list[Delivery]) -> float:
        return POLL_SECONDS

    def settle_applied(self) -> int:
        return 0

    def idle(self) -> bool:
        return True

    def close(self) -> None:
        try:
            self.settler.send_held_while_open()
        finally:
            self.database.close()


@dataclasses.dataclass
class AppliedBatch:
    """A batch an applier thread is done with: its outcome (None if stopped first), or its error."""

    batch: list[Delivery]
    outcome: BatchOutcome | None
    error: BaseException | None
    applier: Applier
    applied_at: float  # time.monotonic() when the handler returned, for the metrics


class AppliersInThreads:
    """Several threads, each with a handler and a database connection; the connection's thread
    hands them batches and settles each one's deliveries when it is applied.

    A window applied alone is waited for, HOLD_BACK_SECONDS at most, before the
    connection's thread reads on: what arrives meanwhile waits in the socket and
    becomes the next window, as with one thread alone. Threads at work at once in
    one process spend CPU beyond their work (the GIL changing hands, each one's
    wake-ups): on a 2-core machine, three threads spent a quarter to two fifths more
    CPU per message than one thread with windows of the same size. A window that
    takes longer is slow (it waits for a row lock, say): until it is settled, the
    deliveries behind it go to a free thread at once. Otherwise, while windows are
    being applied, the deliveries that arrive wait for a busy thread until they fill
    a window or the oldest has waited HOLD_BACK_SECONDS; then a free thread takes
    them. A window costs a transaction, a commit and a NOTIFY whatever its size:
    with a subscription per thread, the reference's compose settings (3 threads,
    prefetch 10) cut a trickle into windows of one or two.
    """

    def __init__(
        self,
        connection: pika.BlockingConnection,
        settler: Settler,
        settings: QueueSettings,
        postgres_url: str,
        handlers: list[BatchHandler],
    ) -> None:
        self.connection = connection
        self.settler = settler
        self.settings = settings
        self.applied: queue.SimpleQueue[AppliedBatch] = queue.SimpleQueue()
        # Set by close(), as the subscription ends: a thread that waits for the database then
        # gives up its batch, which the broker delivers again.
        self.closing = threading.Event()
        self.appliers = [
            Applier(f"consumer-{n}", settings, postgres_url, handler, self.closing, self.applied_one)
            for n, handler in enumerate(handlers, start=1)
        ]
        self.free = list(self.appliers)
        # The batches handed on and not settled yet, oldest first.
        self.in_hand: collections.deque[list[Delivery]] = collections.deque()
        # A batch applied alone that was not done in HOLD_BACK_SECONDS, until it is settled.
        self.slow_batch: list[Delivery] | None = None
        for applier in self.appliers:
            applier.start()

    def applied_one(self, done: AppliedBatch) -> None:
        """In an applier's thread: queue the outcome and wake the connection's thread."""
        self.applied.put(done)
        try:
            self.connection.add_callback_threadsafe(lambda: None)
        except pika.exceptions.AMQPError:
            pass  # the connection is closing: close() settles what is left, or the broker redelivers it

    def can_take(self, waiting: list[Delivery]) -> bool:
        if not self.free:
            return False
        return (
            len(self.free) == len(self.appliers)
            or self.slow_batch is not None
            or len(waiting) >= self.settings.max_batch_size
            or time.monotonic() - waiting[0].received_at >= HOLD_BACK_SECONDS
        )

    def look_again_in(self, waiting: list[Delivery]) -> float:
        if not waiting or not self.free:
            return POLL_SECONDS  # a thread that finishes wakes the connection's (applied_one)
        return max(0.0, waiting[0].received_at + HOLD_BACK_SECONDS - time.monotonic())

    def take(self, batch: list[Delivery]) -> bool:
        self.in_hand.append(batch)
        self.free.pop().inbox.put(batch)
        if len(self.in_hand) == 1:
            self.wait_for_lone(batch)
        return True

    def wait_for_lone(self, batch: list[Delivery]) -> None:
        """Settle `batch`, the only one being applied, once applied; mark it slow after HOLD_BACK_SECONDS."""
        try:
            done = self.applied.get(timeout=HOLD_BACK_SECONDS)
        except queue.Empty:
            self.slow_batch = batch
            metrics.CONSUMER_SLOW_WINDOWS.labels(self.settings.queue).inc()
            return
        self.settle_one(done)

    def settle_applied(self) -> int:
        settled = 0
        while True:
            try:
                done = self.applied.get_nowait()
            except queue.Empty:
                return settled
            settled += self.settle_one(done)

    def settle_one(self, done: AppliedBatch) -> int:
        """Settle an applied batch's deliveries; 1, or 0 for a batch given up. Raises what its applier raised."""
        self.free.append(done.applier)
        if done.batch is self.slow_batch:
            self.slow_batch = None
        if done.error is not None:
            raise done.error
        if done.outcome is None:
            return 0  # given up: its deliveries stay unsettled, and in hand for the acks below
        # An ack of every tag up to the highest would also ack an older batch not settled; a
        # batch leaves the hand only once settled, whatever fails on the way.
        self.settler.settle(done.outcome, up_to_highest=self.in_hand[0] is done.batch)
        self.in_hand.remove(done.batch)
        count_window(self.settings.queue, done.batch, done.outcome, done.applied_at)
        return 1

    def idle(self) -> bool:
        return not self.in_hand

    def close(self) -> None:
        """Stop the threads, settle what they applied meanwhile, and close their connections.

        Called as the subscription ends, often because of an error on its way
        up: an applier's error found here is logged, not raised over that one.
        """
        self.closing.set()
        for applier in self.appliers:
            applier.inbox.put(None)
        processes.join_threads(self.appliers)
        try:
            if self.connection.is_open:
                self.settle_applied()
                self.settler.send_held_while_open()
        except Exception:  # noqa: BLE001 - see the docstring; what is unsettled is delivered again
            logger.exception(
                "Could not settle every window applied while the consumer of %s stopped.", self.settings.queue
            )
        finally:
            for applier in self.appliers:
                applier.database.close()


class Applier(threading.Thread):
    """A thread that applies the batches put in its inbox, one after another, until it gets None."""

    def __init__(
        self,
        name: str,
        settings: QueueSettings,
        postgres_url: str,
        handler: BatchHandler,
        closing: threading.Event,
        report: Callable[[AppliedBatch], None],
    ) -> None:
        super().__init__(name=name)
        self.settings = settings
        self.database = DatabaseSession(postgres_url, f"pyswpt consumer {settings.queue}")
        self.handler = handler
        self.closing = closing
        self.report = report
        self.inbox: queue.SimpleQueue[list[Delivery] | None] = queue.SimpleQueue()
        # Messages handed back while nothing else passes would come straight back.
        self.requeue_backoff = Backoff()

    def run(self) -> None:
        while (batch := self.inbox.get()) is not None:
            try:
                outcome = handle_until_applied(
                    self.database, self.handler, batch, self.settings, self.closing, self.closing.wait
                )
                applied_at = time.monotonic()
                if outcome is not None and outcome.requeued and not outcome.acked:
                    self.closing.wait(self.requeue_backoff.next_pause())
            except BaseException as error:  # noqa: BLE001 - raised again in the connection's thread
                self.report(AppliedBatch(batch, None, error, self, time.monotonic()))
            else:
                self.report(AppliedBatch(batch, outcome, None, self, applied_at))


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
    database: DatabaseSession,
    handler: BatchHandler,
    batch: list[Delivery],
    settings: QueueSettings,
    stopping: threading.Event,
    sleep: Callable[[float], object],
) -> BatchOutcome | None:
    """The handler's outcome for `batch`, retried (pausing with `sleep`) while the database or its
    SQL API is unavailable; None if stopped. Raises ApiUnavailable when the API stays missing too long."""
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
            sleep(pause)
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


class Settler:
    """Tells the broker what became of the deliveries of each window, from the connection's thread.

    Rejections and hand-backs go at once. The ack of every tag up to a
    window's highest is held for ACK_HOLD_SECONDS, and then goes in one frame
    with the windows settled meanwhile: at 20 coordinators most windows hold one
    or two messages, and the broker settles each ack in its quorum queue (the
    end-to-end benchmark: the broker's CPU per transfer 4 to 6 % less). The hold
    never starves the prefetch window: the ack goes at once when it would
    cover half the channel's prefetch count (with a count of 1, the
    reference's, every ack goes at once). What was applied and not acked yet
    when the connection is lost is delivered again, as when a consumer stops
    between a commit and its ack.
    """

    def __init__(self, channel: BlockingChannel, channel_prefetch_count: int) -> None:
        self.channel = channel
        # A prefetch count of 0 is "unlimited": then only the hold's time bounds it.
        self.max_held = channel_prefetch_count // 2 if channel_prefetch_count else MAX_BATCH_SIZE
        self.held_tag: int | None = None
        self.held_count = 0
        self.held_due_at = 0.0  # time.monotonic() when the held ack is to go

    def settle(self, outcome: BatchOutcome, *, up_to_highest: bool) -> None:
        """Reject and hand back first, then ack; with `up_to_highest`, every tag up to the highest
        accepted one in one frame, held (no older delivery may be unsettled then), else tag by tag."""
        for tag in outcome.rejected:
            self.channel.basic_reject(tag, requeue=False)
        for tag in outcome.requeued:
            self.channel.basic_nack(tag, multiple=False, requeue=True)
        if not outcome.acked:
            return
        if not up_to_highest:
            for tag in outcome.acked:
                self.channel.basic_ack(tag, multiple=False)
            return
        if self.held_tag is None:
            self.held_due_at = time.monotonic() + ACK_HOLD_SECONDS
        # Deliveries arrive in tag order and batches are taken from the front: a later window's
        # highest tag is above every held one.
        self.held_tag = max(outcome.acked)
        self.held_count += len(outcome.acked)
        if self.held_count >= self.max_held:
            self.send_held()

    def seconds_until_due(self) -> float:
        """How long until the held ack is due; POLL_SECONDS when none is held."""
        if self.held_tag is None:
            return POLL_SECONDS
        return max(0.0, self.held_due_at - time.monotonic())

    def send_due(self) -> None:
        """Send the held ack once it has waited ACK_HOLD_SECONDS."""
        if self.held_tag is not None and time.monotonic() >= self.held_due_at:
            self.send_held()

    def send_held(self) -> None:
        if self.held_tag is None:
            return
        self.channel.basic_ack(self.held_tag, multiple=True)
        self.held_tag = None
        self.held_count = 0

    def send_held_while_open(self) -> None:
        """As the consumer stops: send the held ack if the channel can still carry it (if not, the
        broker delivers those messages again)."""
        if not self.channel.is_open:
            return
        try:
            self.send_held()
        except amqp.CONNECTION_ERRORS as error:
            logger.warning("Could not ack the last windows as the consumer stopped (%s).", describe_error(error))
