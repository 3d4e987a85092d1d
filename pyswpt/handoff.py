"""Handing the sibling shard's messages on while a child drains its parent's queue (spec 01 §4.4).

After a split, the parent's queue holds messages for both halves of its hash
space, and while the old and the new queues are both bound a message may
reach both. A child that drains the old queue (`pyswpt run consumer
--draining-mode -q OLD`) applies the messages of its own half and hands the
others on: it publishes each again to `accounts_in` with the routing key of
its account, waits for the broker's confirm, and only then acks the original.
The old queue is unbound by then, so the broker routes the message to the
sibling's queue alone. A sibling's message is never parked as foreign: it is
valid, only in the wrong queue.

The routing key is computed from the message's (debtor_id, creditor_id), the
pair that decides which shard owns it: the same key a peer publishes with,
and the right one for a message that reached the old queue another way (put
straight into it through the default exchange).

A message the broker returns (no queue is bound for its key: the sibling's
queue is not subscribed yet) or nacks is handed back to the old queue and
tried again with backoff, with an error line that says so; a lost publishing
connection does the same. Nothing is acked before the broker took its copy,
so a crash hands a message on twice at worst (the receiving shard applies
redelivered SMP messages idempotently), never loses it.
"""

from __future__ import annotations

import logging
import time

import pika

from pyswpt import amqp, wire
from pyswpt.consuming import Delivery
from pyswpt.sharding import binary_routing_key
from pyswpt.transactions import describe_error

logger = logging.getLogger(__name__)

# An idle BlockingConnection answers no heartbeats: one unused this long is replaced before publishing.
PUBLISHER_MAX_IDLE_SECONDS = 10.0


class HandOn:
    """Publishes sibling messages to accounts_in with confirms, on a connection of its own."""

    def __init__(self, broker_url: str, queue: str, clock=time.monotonic):
        self.broker_url = broker_url
        self.queue = queue
        self.clock = clock
        self._publisher: amqp.BatchPublisher | None = None
        self._last_used_at = 0.0

    def hand_on(self, messages: list[tuple[Delivery, int, int]]) -> list[bool]:
        """Publish each (delivery, debtor_id, creditor_id); for each, whether the broker took it."""
        if not messages:
            return []
        outgoing = [outgoing_message(delivery, debtor_id, creditor_id) for delivery, debtor_id, creditor_id in messages]
        try:
            outcomes = self.publisher().publish_each(outgoing)
        except amqp.CONNECTION_ERRORS as error:
            logger.error(
                "Could not hand on %d messages of the sibling shard from %s (%s); they stay in the queue.",
                len(messages),
                self.queue,
                describe_error(error),
            )
            self.close()
            return [False] * len(messages)
        self._last_used_at = self.clock()
        taken = outcomes.count(amqp.Outcome.CONFIRMED)
        if taken:
            logger.info("Handed on %d messages of the sibling shard from %s to accounts_in.", taken, self.queue)
        for (delivery, debtor_id, creditor_id), message, outcome in zip(messages, outgoing, outcomes, strict=True):
            if outcome is not amqp.Outcome.CONFIRMED:
                logger.error(
                    "Could not hand on %s for account (%d, %d) from %s (delivery tag %d): the broker %s it "
                    "(routing key %s). Is the sibling shard's queue bound to accounts_in? It stays in the queue.",
                    delivery.properties.type,
                    debtor_id,
                    creditor_id,
                    self.queue,
                    delivery.delivery_tag,
                    outcome.value,
                    message.routing_key,
                )
        return [outcome is amqp.Outcome.CONFIRMED for outcome in outcomes]

    def publisher(self) -> amqp.BatchPublisher:
        if self._publisher is not None and self.clock() - self._last_used_at > PUBLISHER_MAX_IDLE_SECONDS:
            self.close()
        if self._publisher is None:
            self._publisher = amqp.BatchPublisher(self.broker_url)
        return self._publisher

    def close(self) -> None:
        if self._publisher is not None:
            try:
                self._publisher.close()
            except amqp.CONNECTION_ERRORS:
                pass  # already lost: nothing to close
            self._publisher = None


def outgoing_message(delivery: Delivery, debtor_id: int, creditor_id: int) -> amqp.OutgoingMessage:
    """The delivery as the sibling shard gets it: same body and properties, routed by its account."""
    properties = delivery.properties
    return amqp.OutgoingMessage(
        exchange=wire.ACCOUNTS_IN_EXCHANGE,
        routing_key=binary_routing_key(debtor_id, creditor_id),
        body=delivery.body,
        properties=pika.BasicProperties(
            content_type=properties.content_type,
            content_encoding=properties.content_encoding,
            headers=amqp.without_broker_headers(properties.headers),
            delivery_mode=wire.PERSISTENT_DELIVERY_MODE,
            message_id=properties.message_id,
            timestamp=properties.timestamp,
            type=properties.type,
            app_id=properties.app_id,
        ),
        mandatory=True,
    )
