"""Test-side RabbitMQ helpers: catch what pyswpt publishes, publish what peers send."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika

from pyswpt import topology


@dataclasses.dataclass
class Received:
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes

    @property
    def fields(self) -> dict[str, Any]:
        return json.loads(self.body)


def declare_smp_exchanges(url: str) -> None:
    """Create the SMP exchanges (via a throwaway subscription) so that publishing can route."""
    queue = f"test_exchanges_{uuid.uuid4().hex[:8]}"
    topology.subscribe(url, queue, "#")
    with topology.open_channel(url) as channel:
        channel.queue_delete(queue)
        channel.queue_delete(topology.dead_letter_queue_name(queue))


@contextlib.contextmanager
def catching_queue(url: str, bindings: list[tuple[str, str]]) -> Iterator[Catcher]:
    """A temporary queue bound with (exchange, routing_key) pairs."""
    name = f"test_catch_{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(name, durable=False, auto_delete=False)
        for exchange, routing_key in bindings:
            channel.queue_bind(name, exchange, routing_key)
        yield Catcher(channel, name)
        channel.queue_delete(name)
    finally:
        connection.close()


@dataclasses.dataclass
class Catcher:
    channel: Any
    queue: str

    def collect(self, count: int, timeout_seconds: float = 20.0) -> list[Received]:
        """Exactly `count` messages, waiting at most `timeout_seconds` for them."""
        received: list[Received] = []
        deadline = time.monotonic() + timeout_seconds
        while len(received) < count and time.monotonic() < deadline:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.channel.connection.sleep(0.05)
                continue
            received.append(Received(method.exchange, method.routing_key, properties, body))
        assert len(received) == count, f"expected {count} messages, got {len(received)}"
        return received

    def assert_empty(self) -> None:
        method, _properties, _body = self.channel.basic_get(self.queue, auto_ack=False)
        assert method is None, "an unexpected message arrived"
