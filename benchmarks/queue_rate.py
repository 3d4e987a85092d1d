"""The broker's raw rate on a quorum queue: a ceiling of benchmarks/end_to_end.py.

A publisher, run as a process of its own, sends persistent messages of a
transfer message's size to the SMP queue that `pyswpt configure` would declare
(a quorum queue), in batches that wait for their publisher confirms, as the
node's flusher publishes (pyswpt.amqp.BatchPublisher); the benchmark consumes
them with a prefetch window and multiple acks, as the node's consumer does.
Messages per second through the queue, with no application work on either
side, bound what any node can do through this broker: a transfer moves six
messages (two requests in, four answers out).

    python benchmarks/queue_rate.py AMQP_URL QUEUE SECONDS
"""

from __future__ import annotations

import sys
import time

import pika

from pyswpt import amqp

BATCH_SIZE = 100
PREFETCH_COUNT = 200
BODY_BYTES = 400  # about an AccountTransfer's JSON body
MESSAGES_PER_TRANSFER = 6  # PrepareTransfer, PreparedTransfer, FinalizeTransfer, FinalizedTransfer, 2 AccountTransfers
PROPERTIES = pika.BasicProperties(delivery_mode=2, content_type="application/json", type="AccountTransfer")


def publish_for(url: str, queue: str, seconds: float) -> int:
    """Publish batches to `queue` until `seconds` passed; the number of messages the broker confirmed."""
    message = amqp.OutgoingMessage("", queue, bytes(BODY_BYTES), PROPERTIES, mandatory=False)
    publisher = amqp.BatchPublisher(url)
    confirmed = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            outcomes = publisher.publish_each([message] * BATCH_SIZE)
            confirmed += outcomes.count(amqp.Outcome.CONFIRMED)
    finally:
        publisher.close()
    return confirmed


class Consumer:
    """Consumes `queue`, acking every half prefetch window in one frame, and counts the messages."""

    def __init__(self, url: str, queue: str):
        self.connection = amqp.connect(url)
        self.channel = self.connection.channel()
        self.channel.basic_qos(prefetch_count=PREFETCH_COUNT)
        self.channel.basic_consume(queue, self.on_message)
        self.received = 0
        self.unacked = 0

    def on_message(self, channel, method, _properties, _body: bytes) -> None:
        self.received += 1
        self.unacked += 1
        if self.unacked >= PREFETCH_COUNT // 2:
            channel.basic_ack(method.delivery_tag, multiple=True)
            self.unacked = 0

    def receive(self, seconds: float) -> int:
        """Consume for `seconds`; the number of messages received meanwhile."""
        before = self.received
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.connection.process_data_events(time_limit=left)
        return self.received - before

    def close(self) -> None:
        self.connection.close()


def main() -> int:
    url, queue, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    print(publish_for(url, queue, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
