"""RabbitMQ connections and batch publishing with publisher confirms."""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import time
import urllib.parse
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.spec

from pyswpt import metrics

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


class ConfirmsLost(PublishError):
    """No confirms for a batch: the broker did not answer in time or closed the channel.

    Nothing about the batch is known, so it must be treated as not sent: an
    infrastructure failure, never the fault of a message.
    """


class Outcome(enum.Enum):
    """What the broker did with one message of a batch."""

    CONFIRMED = "confirmed"
    RETURNED = "returned"  # mandatory and unroutable: the broker sent it back
    NACKED = "nacked"  # the broker could not take it (an internal error)


# Headers the broker adds when it delivers or dead-letters a message: a message
# published again (a replay, a hand-on after a split) is a new delivery.
BROKER_HEADERS = frozenset({"x-delivery-count", "x-death", "x-received-from"})
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")

# A lost or refused broker connection, or a batch whose confirms never came:
# the broker's trouble, not the messages'. Retry on a new connection.
CONNECTION_ERRORS = (pika.exceptions.AMQPError, ConnectionError, ConfirmsLost)


def connection_parameters(url: str) -> pika.URLParameters:
    parameters = pika.URLParameters(url)
    given = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    for name, value in CONNECTION_LIMITS.items():
        if name not in given:
            setattr(parameters, name, value)
    return parameters


def connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(connection_parameters(url))


def without_broker_headers(headers: dict[str, Any] | None) -> dict[str, Any] | None:
    """A message's headers without those the broker added."""
    if headers is None:
        return None
    return {
        name: value
        for name, value in headers.items()
        if name not in BROKER_HEADERS and not name.startswith(BROKER_HEADER_PREFIXES)
    }


def probe(url: str, timeout_seconds: float) -> None:
    """Open and close a connection, within `timeout_seconds` for each step; raises if the broker cannot serve."""
    parameters = connection_parameters(url)
    parameters.socket_timeout = timeout_seconds
    parameters.stack_timeout = timeout_seconds
    parameters.connection_attempts = 1
    pika.BlockingConnection(parameters).close()


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
        self._batch: _Batch = _Batch(first_tag=1, size=0)
        self._selected = False
        self._channel.add_on_return_callback(self._on_return)
        self._channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_select_ok)
        self._wait_until(lambda: self._selected, "Confirm.SelectOk")

    def publish(self, messages: list[OutgoingMessage]) -> None:
        """Publish every message; raise PublishError unless the broker took them all."""
        outcomes = self.publish_each(messages)
        nacked = outcomes.count(Outcome.NACKED)
        if nacked:
            raise PublishError(f"received nack for {nacked} of {len(messages)} messages")
        returned = [m for m, outcome in zip(messages, outcomes, strict=True) if outcome is Outcome.RETURNED]
        if returned:
            described = ", ".join(
                f"{m.properties.type} to {m.exchange!r} with key {m.routing_key!r}" for m in returned[:5]
            )
            raise PublishError(f"returned messages (unroutable): {described}")

    def publish_each(self, messages: list[OutgoingMessage]) -> list[Outcome]:
        """Publish every message; say for each, in order, what the broker did with it.

        Raises ConfirmsLost (or a pika error for a lost connection) when the
        outcome of the batch is unknown.
        """
        batch = _Batch(first_tag=self._next_delivery_tag, size=len(messages))
        self._batch = batch
        for index, message in enumerate(messages):
            if message.mandatory:
                batch.returnable[(message.exchange, message.routing_key, message.body)].append(index)
            self._channel.basic_publish(
                exchange=message.exchange,
                routing_key=message.routing_key,
                body=message.body,
                properties=message.properties,
                mandatory=message.mandatory,
            )
            self._next_delivery_tag += 1
        self._coalesce_output()
        self._wait_until(lambda: not batch.unconfirmed, "publisher confirms")
        outcomes = batch.outcomes()
        count_published(messages, outcomes)
        return outcomes

    def keep_alive(self) -> None:
        """Answer broker heartbeats; call it at least every few seconds while idle."""
        self.connection.process_data_events(time_limit=0)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def _coalesce_output(self) -> None:
        """Join the frames waiting to be sent into one buffer, sent with one syscall.

        pika buffers each frame (three per message) apart and sends each with a
        syscall, and with TCP_NODELAY a segment, of its own: for a batch, that
        cost the flusher and the broker more CPU than the messages themselves.
        Nothing is sent before the wait that follows, so the whole batch is
        buffered here. Where pika keeps its buffers elsewhere this does nothing
        (tests/test_amqp.py says so).
        """
        transport = getattr(self.connection._impl, "_transport", None)
        buffers = getattr(transport, "_tx_buffers", None)
        if buffers is not None and len(buffers) > 1:
            joined = b"".join(buffers)
            buffers.clear()
            buffers.append(joined)

    def _wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + CONFIRM_TIMEOUT_SECONDS
        while not condition():
            if self._channel.is_closed:
                raise ConfirmsLost(f"the broker closed the publishing channel while waiting for {what}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfirmsLost(f"no {what} from the broker within {CONFIRM_TIMEOUT_SECONDS} s")
            self.connection.process_data_events(time_limit=min(remaining, 1.0))

    def _on_select_ok(self, _frame) -> None:
        self._selected = True
        self._wake()

    def _on_confirm(self, frame) -> None:
        # Confirms may come out of order, one by one or for all tags up to one.
        method = frame.method
        batch = self._batch
        if method.multiple:
            confirmed = {tag for tag in batch.unconfirmed if tag <= method.delivery_tag}
        else:
            confirmed = {method.delivery_tag} & batch.unconfirmed
        batch.unconfirmed -= confirmed
        if isinstance(method, pika.spec.Basic.Nack):
            batch.nacked |= confirmed
        if not batch.unconfirmed:
            self._wake()

    def _wake(self) -> None:
        """End the current process_data_events() wait now.

        The raw channel's callbacks are not events BlockingConnection waits
        for, so without a ready (zero-delay) timer every wait would last its
        whole time limit: a second per batch.
        """
        self.connection.call_later(0, _do_nothing)

    def _on_return(self, _channel, method: pika.spec.Basic.Return, properties, body: bytes) -> None:
        if not self._batch.match_return(method.exchange, method.routing_key, body):
            logger.warning(
                "The broker returned a %s to %r with key %r that is not in the current batch.",
                properties.type,
                method.exchange,
                method.routing_key,
            )


@dataclasses.dataclass
class _Batch:
    """The delivery tags of one published batch and what the broker said about them.

    Returns carry no delivery tag, and outgoing messages carry no id of their
    own (spec 01 §3.1), so a return is matched by publish order: to the first
    not yet returned message of the batch with the same exchange, routing key
    and body that is still unconfirmed (its ack comes after its return).
    """

    first_tag: int
    size: int
    unconfirmed: set[int] = dataclasses.field(init=False)
    nacked: set[int] = dataclasses.field(default_factory=set)
    returned: set[int] = dataclasses.field(default_factory=set)
    # (exchange, routing key, body) -> indexes in publish order of the mandatory messages not yet returned.
    returnable: collections.defaultdict[tuple[str, str, bytes], collections.deque[int]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.deque)
    )

    def __post_init__(self) -> None:
        self.unconfirmed = set(range(self.first_tag, self.first_tag + self.size))

    def match_return(self, exchange: str, routing_key: str, body: bytes) -> bool:
        candidates = self.returnable.get((exchange, routing_key, body))
        while candidates:
            tag = self.first_tag + candidates.popleft()
            if tag in self.unconfirmed:
                self.returned.add(tag)
                return True
        return False

    def outcomes(self) -> list[Outcome]:
        assert not self.unconfirmed, "outcomes are known only once every message is confirmed"
        return [self._outcome(self.first_tag + index) for index in range(self.size)]

    def _outcome(self, tag: int) -> Outcome:
        if tag in self.returned:
            return Outcome.RETURNED
        if tag in self.nacked:
            return Outcome.NACKED
        return Outcome.CONFIRMED


def count_published(messages: list[OutgoingMessage], outcomes: list[Outcome]) -> None:
    """pyswpt_messages_published_total, once the broker has said what it did with each message."""
    counts = collections.Counter(
        (metrics.exchange_label(message.exchange), metrics.message_type_label(message.properties.type), outcome.value)
        for message, outcome in zip(messages, outcomes, strict=True)
    )
    for (exchange, message_type, outcome), count in counts.items():
        metrics.MESSAGES_PUBLISHED.labels(exchange, message_type, outcome).inc(count)


def _do_nothing() -> None:
    pass
