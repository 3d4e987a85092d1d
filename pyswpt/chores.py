"""The chores producer (spec 01 §5): the accounts scanner's chores to the chores queue.

Chores do not go through the outbox: the scanner publishes each step's chores
as one batch with publisher confirms, straight to CHORES_BROKER_QUEUE through
the default exchange. They are mandatory, so a missing queue makes the batch
fail (PublishError) instead of losing it silently; every handler re-checks its
conditions, so a chore sent twice is harmless.
"""

from __future__ import annotations

import contextlib
import dataclasses

from pyswpt import amqp, wire
from pyswpt.messages import Chore


def chore_fields(chore: Chore) -> dict[str, object]:
    """The JSON fields of a chore in wire order: `type` first, then the dataclass fields."""
    return {"type": chore.TYPE, **{field.name: getattr(chore, field.name) for field in dataclasses.fields(chore)}}


def chore_message(chore: Chore, chores_queue: str) -> amqp.OutgoingMessage:
    exchange, routing_key, mandatory = wire.chore_destination(chores_queue)
    return amqp.OutgoingMessage(
        exchange=exchange,
        routing_key=routing_key,
        body=wire.chore_body(chore_fields(chore)),
        properties=wire.chore_properties(chore.TYPE),
        mandatory=mandatory,
    )


class ChoresPublisher:
    """Publishes batches of chores to one chores queue; raises PublishError unless all were taken.

    The broker connection is opened when needed: after the broker dropped it,
    the next batch opens a new one, so a scanner outlives a broker restart.
    """

    def __init__(self, broker_url: str, chores_queue: str):
        self.broker_url = broker_url
        self.chores_queue = chores_queue
        self._publisher: amqp.BatchPublisher | None = amqp.BatchPublisher(broker_url)

    def publish(self, chores: list[Chore]) -> None:
        if not chores:
            return
        if self._publisher is None:
            self._publisher = amqp.BatchPublisher(self.broker_url)
        try:
            self._publisher.publish([chore_message(chore, self.chores_queue) for chore in chores])
        except amqp.CONNECTION_ERRORS:
            self.close()
            raise

    def keep_alive(self) -> None:
        """Answer broker heartbeats; call it at least every few seconds while idle.

        A connection found lost is dropped quietly: the next publish reconnects.
        """
        if self._publisher is None:
            return
        try:
            self._publisher.keep_alive()
        except amqp.CONNECTION_ERRORS:
            self.close()

    def close(self) -> None:
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            with contextlib.suppress(*amqp.CONNECTION_ERRORS):
                publisher.close()
