"""The chores producer (spec 01 §5): the accounts scanner's chores to the chores queue.

Chores do not go through the outbox: the scanner publishes each step's chores
as one batch with publisher confirms, straight to CHORES_BROKER_QUEUE through
the default exchange. They are mandatory, so a missing queue makes the batch
fail (PublishError) instead of losing it silently; every handler re-checks its
conditions, so a chore sent twice is harmless.
"""

from __future__ import annotations

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
    """Publishes batches of chores to one chores queue; raises PublishError unless all were taken."""

    def __init__(self, broker_url: str, chores_queue: str):
        self.chores_queue = chores_queue
        self._publisher = amqp.BatchPublisher(broker_url)

    def publish(self, chores: list[Chore]) -> None:
        if chores:
            self._publisher.publish([chore_message(chore, self.chores_queue) for chore in chores])

    def keep_alive(self) -> None:
        """Answer broker heartbeats; call it at least every few seconds while idle."""
        self._publisher.keep_alive()

    def close(self) -> None:
        self._publisher.close()
