"""Test-side RabbitMQ helpers: catch what pyswpt publishes, publish what peers send."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import vhosts

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


@contextlib.contextmanager
def plain_queue(url: str, prefix: str) -> Iterator[str]:
    """A classic queue of its own, named after `prefix`, deleted afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with topology.open_channel(url) as channel:
        channel.queue_declare(name)
    yield name
    with topology.open_channel(url) as channel:
        channel.queue_delete(name)


def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """The queue's ready messages and consumers."""
    with topology.open_channel(url) as channel:
        method = channel.queue_declare(queue, passive=True).method
    return method.message_count, method.consumer_count


def unacked_messages(url: str, queue: str) -> int:
    """The queue's messages delivered and not acked yet: only the broker's own tool tells."""
    listing = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "-p",
            vhosts.vhost_of(url),
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [count] = [line.split("\t")[1] for line in listing.splitlines() if line.split("\t")[0] == queue]
    return int(count)


def ready_messages(url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message ready in the queue now, taken out of it."""
    found = []
    with topology.open_channel(url) as channel:
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties, body))


AMQP_PORT = 5672  # pika's default when the URL names none
# Closing a connection from the broker's side, or counting unacked messages, needs the broker's own tool.
HAS_RABBITMQCTL = shutil.which("rabbitmqctl") is not None
CAN_CLOSE_BROKER_CONNECTIONS = HAS_RABBITMQCTL and shutil.which("ss") is not None


def broker_connection_of(pid: int, broker_url: str) -> str:
    """The broker's process id of the AMQP connection that OS process `pid` opened to `broker_url`."""
    broker_port = urllib.parse.urlsplit(broker_url).port or AMQP_PORT
    sockets = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=True).stdout
    ports = [
        local.rsplit(":", 1)[1]
        for local, peer, users in re.findall(r"\S+\s+\S+\s+\S+\s+(\S+)\s+(\S+)\s+(.*)", sockets)
        if peer.endswith(f":{broker_port}") and f"pid={pid}," in users
    ]
    assert len(ports) == 1, f"expected one broker connection of pid {pid}, found {ports}"
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"], capture_output=True, text=True, check=True
    ).stdout
    [broker_pid] = [line.split("\t")[0] for line in listing.splitlines() if line.endswith(f"\t{ports[0]}")]
    return broker_pid


def close_broker_connection_of(pid: int, broker_url: str) -> None:
    """Have the broker close the AMQP connection that OS process `pid` opened to `broker_url`."""
    broker_connection = broker_connection_of(pid, broker_url)
    subprocess.run(["rabbitmqctl", "-q", "close_connection", broker_connection, "test: broker went away"], check=True)
