"""A stand-in node that answers transfers at once from memory: the ceiling of broker + load generator.

Run by benchmarks/end_to_end.py as a process of its own, so that its CPU is
told apart from the load generator's. It consumes the SMP queue that
`pyswpt configure` would declare (a quorum queue), answers each
PrepareTransfer with a PreparedTransfer and each FinalizeTransfer with a
FinalizedTransfer and the two AccountTransfers (sender's and recipient's),
built by the node's own outbox and wire code, and publishes them through the
same exchanges — what a node does, less the database. No publisher
confirms: the stand-in is meant to be as cheap as the broker allows.

    python benchmarks/stand_in.py AMQP_URL QUEUE
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import signal
import sys
from typing import Any

import pika

from pyswpt import outbox, wire
from pyswpt.sharding import i64_from_u64

PREFETCH_COUNT = 200
NEVER = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
DEMURRAGE_RATE = -50.0
COMMIT_PERIOD = dt.timedelta(days=30)


class StandIn:
    def __init__(self, url: str, queue: str):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.basic_qos(prefetch_count=PREFETCH_COUNT)
        self.channel.basic_consume(queue, self.on_message)
        self.transfer_ids = itertools.count(1)
        self.prepared: dict[int, dict[str, Any]] = {}
        self.transfer_numbers: dict[int, int] = {}

    def on_message(self, channel, method, properties, body: bytes) -> None:
        fields = json.loads(body)
        now = dt.datetime.now(dt.UTC)
        if properties.type == "PrepareTransfer":
            self.prepare(fields, now)
        elif properties.type == "FinalizeTransfer":
            self.finalize(fields, now)
        channel.basic_ack(method.delivery_tag)

    def prepare(self, fields: dict[str, Any], now: dt.datetime) -> None:
        transfer_id = next(self.transfer_ids)
        row = {
            "debtor_id": fields["debtor_id"],
            "sender_creditor_id": fields["creditor_id"],
            "transfer_id": transfer_id,
            "coordinator_type": fields["coordinator_type"],
            "coordinator_id": fields["coordinator_id"],
            "coordinator_request_id": fields["coordinator_request_id"],
            "locked_amount": fields["max_locked_amount"],
            "recipient_creditor_id": i64_from_u64(int(fields["recipient"])),
            "prepared_at": now,
            "inserted_at": now,
            "demurrage_rate": DEMURRAGE_RATE,
            "deadline": now + COMMIT_PERIOD,
            "final_interest_rate_ts": dt.datetime.fromisoformat(fields["final_interest_rate_ts"]),
        }
        self.prepared[transfer_id] = row
        self.publish("PreparedTransfer", outbox.prepared_transfer(row, None))

    def finalize(self, fields: dict[str, Any], now: dt.datetime) -> None:
        row = self.prepared.pop(fields["transfer_id"], None)
        if row is None:
            return  # finalized already: a redelivery
        amount = min(fields["committed_amount"], row["locked_amount"])
        finalized = {**row, "finalized_at": now, "committed_amount": amount, "total_locked_amount": 0}
        finalized["status_code"] = "OK"
        self.publish("FinalizedTransfer", outbox.finalized_transfer(finalized, None))
        for creditor_id, other_creditor_id, acquired_amount in (
            (row["sender_creditor_id"], row["recipient_creditor_id"], -amount),
            (row["recipient_creditor_id"], row["sender_creditor_id"], amount),
        ):
            self.publish(
                "AccountTransfer",
                self.account_transfer(row, fields, creditor_id, other_creditor_id, acquired_amount, now),
            )

    def account_transfer(
        self, row: dict, fields: dict, creditor_id: int, other_creditor_id: int, acquired_amount: int, now: dt.datetime
    ) -> dict[str, Any]:
        number = self.transfer_numbers.get(creditor_id, 0) + 1
        self.transfer_numbers[creditor_id] = number
        transfer = {
            "debtor_id": row["debtor_id"],
            "creditor_id": creditor_id,
            "other_creditor_id": other_creditor_id,
            "creation_date": NEVER.date(),
            "transfer_number": number,
            "coordinator_type": row["coordinator_type"],
            "committed_at": now,
            "acquired_amount": acquired_amount,
            "transfer_note_format": fields["transfer_note_format"],
            "transfer_note": fields["transfer_note"],
            "principal": 0,
            "previous_transfer_number": number - 1,
            "inserted_at": now,
        }
        return outbox.account_transfer(transfer, None)

    def publish(self, message_type: str, fields: dict[str, Any]) -> None:
        exchange, routing_key, mandatory = wire.destination(message_type, fields)
        properties = wire.smp_properties(message_type, fields)
        self.channel.basic_publish(exchange, routing_key, wire.smp_body(fields), properties, mandatory=mandatory)


def main() -> int:
    url, queue = sys.argv[1:3]
    stand_in = StandIn(url, queue)
    signal.signal(signal.SIGTERM, lambda *_: stand_in.channel.stop_consuming())
    stand_in.channel.start_consuming()
    stand_in.connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
