"""RabbitMQ connections and batch publishing with publisher confirms."""

from __future__ import annotations

import dataclasses
import logging
import time
import urllib.parse

import pika
import pika.channel
import pika.spec

logger = logging.getLogger(__name__)

CONFIRM_TIMEOUT_SECONDS = 120.0
# Bounds on every blocking call: connecting (socket and whole handshake), a
# broker that stops reading because of a resource alarm, and a broker that
# stops answering an RPC (the heartbeat closes the connection). Applied only
# where the URL's own query string does not set them.
CONNECTION_LIMITS = {
    "socket_timeout": 10.0,
    "stack_timeout": 20.0,
    "blocked_connection_timeout": 60.0,
    "heartbeat": 30,
}


class PublishError(Exception):
    """The broker did not take every message of a batch (nacked or unroutable)."""


def connection_parameters(url: str) -> pika.URLParameters:
    parameters = pika.URLParameters(url)
    given = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    for name, value in CONNECTION_LIMITS.items():
        if name not in given:
            setattr(parameters, name, value)
    return parameters


def connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(connection_parameters(url))


@dataclasses.dataclass(frozen=True)
class OutgoingMessage:
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    mandatory: bool


class BatchPublisher:
    """Publishes a batch in one go, then waits once for all of its confirms.

    pika's BlockingChannel waits for the confirm of each message before sending
    the next one, which costs a broker round trip (and a quorum-queue commit)
    per message. This class drives the underlying asynchronous channel instead:
    every message of the batch is sent, then confirms and returns are collected
    until the last delivery tag is acknowledged. The broker sends a Basic.Return
    before the Basic.Ack of the same message, so returns are known by then.
    """

    def __init__(self, url: str):
        self.connection = connect(url)
        self._channel: pika.channel.Channel = self.connection.channel()._impl
        self._next_delivery_tag = 1
        self._unconfirmed: set[int] = set()
        self._nacked = 0
        self._returned: list[str] = []
        self._selected = False
        self._channel.add_on_return_callback(self._on_return)
        self._channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_select_ok)
        self._wait_until(lambda: self._selected, "Confirm.SelectOk")

    def publish(self, messages: list[OutgoingMessage]) -> None:
        """Publish every message; raise PublishError unless the broker took them all."""
        self._nacked = 0
        self._returned.clear()
        for message in messages:
            self._channel.basic_publish(
                exchange=message.exchange,
                routing_key=message.routing_key,
                body=message.body,
                properties=message.properties,
                mandatory=message.mandatory,
            )
            self._unconfirmed.add(self._next_delivery_tag)
            self._next_delivery_tag += 1
        self._wait_until(lambda: not self._unconfirmed, "publisher confirms")
        if self._nacked:
            raise PublishError(f"received nack for {self._nacked} of {len(messages)} messages")
        if self._returned:
            raise PublishError(f"returned messages (unroutable): {', '.join(self._returned[:5])}")

    def keep_alive(self) -> None:
        """Answer broker heartbeats; call it at least every few seconds while idle."""
        self.connection.process_data_events(time_limit=0)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def _wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + CONFIRM_TIMEOUT_SECONDS
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(f"no {what} from the broker within {CONFIRM_TIMEOUT_SECONDS} s")
            self.connection.process_data_events(time_limit=min(remaining, 1.0))

    def _on_select_ok(self, _frame) -> None:
        self._selected = True
        self._wake()

    def _on_confirm(self, frame) -> None:
        # Confirms may come out of order, one by one or for all tags up to one.
        method = frame.method
        if method.multiple:
            confirmed = {tag for tag in self._unconfirmed if tag <= method.delivery_tag}
        else:
            confirmed = {method.delivery_tag} & self._unconfirmed
        self._unconfirmed -= confirmed
        if isinstance(method, pika.spec.Basic.Nack):
            self._nacked += len(confirmed)
        if not self._unconfirmed:
            self._wake()

    def _wake(self) -> None:
        """End the current process_data_events() wait now.

        The raw channel's callbacks are not events BlockingConnection waits
        for, so without a ready (zero-delay) timer every wait would last its
        whole time limit: a second per batch.
        """
        self.connection.call_later(0, _do_nothing)

    def _on_return(self, _channel, method: pika.spec.Basic.Return, properties, _body) -> None:
        self._returned.append(f"{properties.type} to {method.exchange!r} with key {method.routing_key!r}")


def _do_nothing() -> None:
    pass
