"""RabbitMQ objects of one shard: exchanges, bindings, the SMP queue and the chores queue.

Spec 01 §3.7. Peers and queues created by the reference service depend on the
exact names, types and argument tables below: RabbitMQ refuses to re-declare
an existing queue or exchange with different settings (PRECONDITION_FAILED),
so a drop-in replacement must declare them byte for byte the same way. Every
function here is idempotent: running it again changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

from pyswpt import amqp

logger = logging.getLogger(__name__)

# The exchanges every shard and peer shares (§3.2), all durable.
ACCOUNTS_IN = "accounts_in"
TO_CREDITORS = "to_creditors"
TO_DEBTORS = "to_debtors"
TO_COORDINATORS = "to_coordinators"
EXCHANGES = (
    (ACCOUNTS_IN, "topic"),
    (TO_CREDITORS, "topic"),
    (TO_DEBTORS, "topic"),
    (TO_COORDINATORS, "headers"),
)

# `to_coordinators` forwards by the `coordinator-type` header (§3.2): direct and
# agent coordinators live on the creditors side, issuing ones on the debtors side.
COORDINATOR_ROUTES = (
    (TO_CREDITORS, "direct"),
    (TO_CREDITORS, "agent"),
    (TO_DEBTORS, "issuing"),
)

DEAD_LETTER_SUFFIX = ".XQ"
CHORES_QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}
DEAD_LETTER_QUEUE_ARGUMENTS = {"x-queue-type": "stream"}

NOT_FOUND = 404
DELETE_QUEUE_POLL_SECONDS = 3.0


def dead_letter_queue_name(queue: str) -> str:
    return queue + DEAD_LETTER_SUFFIX


def main_queue_arguments(queue: str) -> dict[str, str]:
    """The reference's argument table of the SMP queue, quirks included (§3.7 step 4)."""
    return {
        "x-queue-type": "quorum",
        # (quirk) RabbitMQ only honours `x-overflow`; the reference declares
        # `overflow`, and existing queues carry it, so it must stay as it is.
        "overflow": "reject-publish",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue_name(queue),
    }


@contextlib.contextmanager
def open_connection(url: str) -> Iterator[pika.BlockingConnection]:
    """A fresh connection, closed whatever happens."""
    connection = amqp.connect(url)
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


@contextlib.contextmanager
def open_channel(url: str) -> Iterator[BlockingChannel]:
    with open_connection(url) as connection:
        yield connection.channel()


def declare_chores_queue(url: str, queue: str) -> None:
    """`create_chores_queue`: the chores queue, with no dead-letter settings (§3.7)."""
    with open_channel(url) as channel:
        channel.queue_declare(queue, durable=True, arguments=CHORES_QUEUE_ARGUMENTS)
    logger.info('Declared "%s" chores queue.', queue)


def subscribe(url: str, queue: str, routing_key: str) -> None:
    """Declare the exchanges, their bindings, the SMP queue and its dead-letter stream (§3.7)."""
    with open_channel(url) as channel:
        for exchange, exchange_type in EXCHANGES:
            channel.exchange_declare(exchange, exchange_type=exchange_type, durable=True)
            logger.info('Declared "%s" exchange (%s).', exchange, exchange_type)
        for destination, coordinator_type in COORDINATOR_ROUTES:
            channel.exchange_bind(
                destination=destination,
                source=TO_COORDINATORS,
                routing_key="",
                arguments={"x-match": "all", "coordinator-type": coordinator_type},
            )
            logger.info(
                'Bound "%s" to "%s" for coordinator-type "%s".',
                destination,
                TO_COORDINATORS,
                coordinator_type,
            )
        dead_letter_queue = dead_letter_queue_name(queue)
        channel.queue_declare(dead_letter_queue, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
        logger.info('Declared "%s" dead-letter queue.', dead_letter_queue)
        channel.queue_declare(queue, durable=True, arguments=main_queue_arguments(queue))
        logger.info('Declared "%s" queue.', queue)
        channel.queue_bind(queue, ACCOUNTS_IN, routing_key=routing_key)
        logger.info('Bound "%s" to "%s" with binding key "%s".', queue, ACCOUNTS_IN, routing_key)


def unsubscribe(url: str, queue: str, routing_key: str, chores_url: str, chores_queue: str) -> None:
    """Stop routing to the SMP queue and delete the chores queue (§3.7, §4.4).

    The reference deletes the queue named like the SMP queue on the chores
    broker, which destroys the SMP queue when both brokers are one server and
    leaves the chores queue behind. This deletes the chores queue, as its log
    line has always claimed.
    """
    with open_channel(url) as channel:
        try:
            channel.queue_unbind(queue, ACCOUNTS_IN, routing_key=routing_key)
        except ChannelClosedByBroker as error:
            if error.reply_code != NOT_FOUND:
                raise
            # The queue or the exchange is already gone, and the binding with it.
            logger.info('No "%s" queue or "%s" exchange to unbind.', queue, ACCOUNTS_IN)
        else:
            logger.info('Unbound "%s" from "%s" (binding key "%s").', queue, ACCOUNTS_IN, routing_key)
    with open_channel(chores_url) as channel:
        # Deleting a missing queue succeeds, so this is idempotent too.
        channel.queue_delete(chores_queue)
    logger.info('Deleted "%s" chores queue.', chores_queue)


def delete_queue(
    url: str,
    queue: str,
    *,
    poll_seconds: float = DELETE_QUEUE_POLL_SECONDS,
    max_attempts: int | None = None,
    on_message_count: Callable[[int], object] = lambda _count: None,
) -> bool:
    """Delete the queue once it holds no message and has no consumer (§3.7 `delete_queue`, §4.4).

    Quorum queues ignore the if-empty/if-unused flags, so the queue is checked
    with a passive declare first. The reference looks at the message count
    only, which leaves out the messages a consumer holds unacknowledged:
    deleting then would lose them. Waiting also for no consumer is safe with
    draining consumers (`run consumer --draining-mode`), which step back
    together only with nothing unacknowledged; a queue nobody publishes to
    any more (unbound) stays empty from then on. Returns True when the queue
    is gone, False when `max_attempts` checks all found it in use (None: keep
    trying forever, as the reference does). `on_message_count` is told
    each count found (the command shows how far the queue drained).
    """
    attempt = 0
    with open_connection(url) as connection:
        while True:
            attempt += 1
            in_use = _delete_if_unused(connection.channel(), queue)
            on_message_count(0 if in_use is None else in_use[0])
            if in_use is None:
                return True
            if max_attempts is not None and attempt >= max_attempts:
                return False
            message_count, consumer_count = in_use
            # Debug: the command's progress shows the count.
            logger.debug(
                'Queue "%s" still has %d messages and %d consumers; checking again in %s s.',
                queue,
                message_count,
                consumer_count,
                poll_seconds,
            )
            time.sleep(poll_seconds)


def _delete_if_unused(channel: BlockingChannel, queue: str) -> tuple[int, int] | None:
    """Delete the queue if it is missing, or has neither messages nor consumers; else its counts."""
    try:
        status = channel.queue_declare(queue, passive=True)
    except ChannelClosedByBroker as error:
        if error.reply_code != NOT_FOUND:
            raise
        logger.info('Queue "%s" does not exist.', queue)
        return None
    counts = (status.method.message_count, status.method.consumer_count)
    if counts == (0, 0):
        channel.queue_delete(queue)
        logger.info('Deleted "%s" queue.', queue)
        channel.close()
        return None
    channel.close()
    return counts
