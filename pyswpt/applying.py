"""Applying a window of consumed messages: together if possible, else one at a time.

A window's SQL calls run in one transaction. When the database refuses it,
the calls run again one per transaction, so that the message at fault is
found and the others still commit. A message is parked (stored in
pyswpt.parked_message, then rejected to the dead-letter queue) when

* it could not be decoded, or belongs to another shard (refused before any SQL);
* the database refuses it (a data, integrity or RAISE error of its own);
* it keeps failing otherwise (a statement timeout, say) — after
  MAX_DELIVERY_ATTEMPTS deliveries, and only while other messages pass, since
  a failure that hits every message is the server's, not the message's.

Infrastructure errors (pyswpt.transactions.is_infrastructure_error) are never
a message's fault: they propagate, and the caller retries the whole window.
Attempts are counted by the broker (the quorum queue's x-delivery-count), so
the count survives a crash of the consumer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import psycopg

from pyswpt import parking
from pyswpt.consuming import Delivery
from pyswpt.logs import one_line
from pyswpt.transactions import (
    REFUSING_ERRORS,
    SqlCall,
    describe_error,
    execute_calls,
    is_infrastructure_error,
)

logger = logging.getLogger(__name__)

MAX_DELIVERY_ATTEMPTS = 3
# A failure counts as the message's own only if another message passed this recently.
NEIGHBOUR_SUCCESS_WINDOW_SECONDS = 60.0
DELIVERY_COUNT_HEADER = "x-delivery-count"


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a message is parked: a short code, one line of reason, the SQLSTATE if any."""

    code: str
    reason: str
    sqlstate: str | None = None


@dataclasses.dataclass
class Item:
    """One delivery and what to do with it: its SQL call, or the refusal that parks it."""

    delivery: Delivery
    what: str  # names the message in logs, e.g. "PrepareTransfer for account (1, 2)"
    call: SqlCall | None = None
    refusal: Refusal | None = None
    debtor_id: int | None = None
    creditor_id: int | None = None


@dataclasses.dataclass
class Closing:
    """The last call of a transaction that applies items; `row`, its first row, once made."""

    call: SqlCall
    row: tuple | None = None


# The closing call of a transaction that applies these items, if they need one.
ClosingFor = Callable[[list[Item]], Closing | None]


@dataclasses.dataclass(frozen=True)
class Applied:
    row: tuple | None  # the first row of the call's result


@dataclasses.dataclass(frozen=True)
class Parked:
    """Reject the message (to the dead-letter queue, if any); `stored`: PostgreSQL keeps it too.

    A message is not stored when its source and reason are at the cap of
    parked messages, or when parking it failed.
    """

    stored: bool


class Requeued:
    """The message failed, but not often enough to be parked: the broker redelivers it."""


PARKED = Parked(stored=True)
NOT_STORED = Parked(stored=False)
REQUEUED = Requeued()
# What pyswpt.park_message says when it kept the message.
STORED_OUTCOMES = ("parked", "parked_again")
Result = Applied | Parked | Requeued


def parked_result(outcome: str) -> Parked:
    """The result of parking, from what park_message said (or why it failed)."""
    return PARKED if outcome in STORED_OUTCOMES else NOT_STORED


def delivery_attempts(delivery: Delivery) -> int:
    """How many times the broker has delivered this message, this time included.

    Quorum queues count returns in x-delivery-count; a classic queue only says
    "redelivered", which is taken as the last attempt allowed.
    """
    count = (delivery.properties.headers or {}).get(DELIVERY_COUNT_HEADER)
    if isinstance(count, int) and count >= 0:
        return count + 1
    return MAX_DELIVERY_ATTEMPTS if delivery.redelivered else 1


class WindowApplier:
    """Applies windows of one queue's deliveries; remembers when a message last passed."""

    def __init__(self, queue: str, clock=time.monotonic):
        self.queue = queue
        self.clock = clock
        self.last_success_at: float | None = None

    def apply(self, conn: psycopg.Connection, items: list[Item], closing_for: ClosingFor | None = None) -> list[Result]:
        """Apply every item; the result of each, in order.

        `closing_for` gives the last call of each transaction that applies items,
        the window's or, one at a time, each item's: work it may do at once, which
        the workers do otherwise. A closing's row is set when its transaction committed.
        """
        if not items:
            return []
        try:
            return self.apply_together(conn, items, closing_for and closing_for(items))
        except psycopg.Error as error:
            if is_infrastructure_error(error):
                raise
            logger.warning(
                "A window of %d messages from %s failed (%s); applying them one at a time.",
                len(items),
                self.queue,
                describe_error(error),
            )
        return self.apply_one_by_one(conn, items, closing_for)

    def apply_together(self, conn: psycopg.Connection, items: list[Item], closing: Closing | None) -> list[Result]:
        calls = [item.call if item.call is not None else self.park_call(item, item.refusal) for item in items]
        rows = run_closed(conn, calls, closing)
        results: list[Result] = []
        for item, row in zip(items, rows, strict=True):
            if item.call is None:
                self.log_parked(item, item.refusal, row[0])
                results.append(parked_result(row[0]))
            else:
                results.append(Applied(row))
        if any(item.call is not None for item in items):
            self.last_success_at = self.clock()
        return results

    def apply_one_by_one(
        self, conn: psycopg.Connection, items: list[Item], closing_for: ClosingFor | None
    ) -> list[Result]:
        results: list[Result | psycopg.Error] = [self.apply_alone(conn, item, closing_for) for item in items]
        # Decided last, so that every neighbour of the window had its chance to pass.
        return [
            self.park_or_requeue(conn, item, result) if isinstance(result, psycopg.Error) else result
            for item, result in zip(items, results, strict=True)
        ]

    def apply_alone(
        self, conn: psycopg.Connection, item: Item, closing_for: ClosingFor | None
    ) -> Result | psycopg.Error:
        """The item in a transaction of its own; a failure that is not refusal is returned."""
        if item.call is None:
            return self.park(conn, item, item.refusal)
        try:
            row = run_closed(conn, [item.call], closing_for and closing_for([item]))[0]
        except psycopg.Error as error:
            if is_infrastructure_error(error):
                raise
            if isinstance(error, REFUSING_ERRORS):
                refusal = Refusal("refused", f"refused by the database ({describe_error(error)})", error.sqlstate)
                return self.park(conn, item, refusal)
            return error
        self.last_success_at = self.clock()
        return Applied(row)

    def park_or_requeue(self, conn: psycopg.Connection, item: Item, error: psycopg.Error) -> Result:
        attempts = delivery_attempts(item.delivery)
        if attempts >= MAX_DELIVERY_ATTEMPTS and self.neighbours_pass():
            reason = f"failed {attempts} times while other messages passed ({describe_error(error)})"
            return self.park(conn, item, Refusal("repeated_failure", reason, error.sqlstate))
        logger.warning(
            "%s from %s (delivery tag %d) failed on attempt %d of %d (%s); it will be delivered again.",
            item.what,
            self.queue,
            item.delivery.delivery_tag,
            attempts,
            MAX_DELIVERY_ATTEMPTS,
            describe_error(error),
        )
        return REQUEUED

    def neighbours_pass(self) -> bool:
        return self.last_success_at is not None and (
            self.clock() - self.last_success_at <= NEIGHBOUR_SUCCESS_WINDOW_SECONDS
        )

    def park(self, conn: psycopg.Connection, item: Item, refusal: Refusal) -> Result:
        call = self.park_call(item, refusal)
        try:
            outcome = execute_calls(conn, [call])[0][0]
        except psycopg.Error as error:
            if is_infrastructure_error(error):
                raise
            # Looping on a message that cannot even be parked would stop the queue.
            outcome = f"not stored, parking failed ({describe_error(error)})"
        self.log_parked(item, refusal, outcome)
        return parked_result(outcome)

    def park_call(self, item: Item, refusal: Refusal) -> SqlCall:
        delivery = item.delivery
        properties = delivery.properties
        return parking.park_call(
            parking.Parcel(
                source_kind=parking.SOURCE_QUEUE,
                source_name=self.queue,
                exchange=delivery.exchange,
                routing_key=delivery.routing_key,
                message_type=properties.type,
                content_type=properties.content_type,
                headers=properties.headers,
                body=delivery.body,
                debtor_id=item.debtor_id,
                creditor_id=item.creditor_id,
                reason_code=refusal.code,
                reason=one_line(refusal.reason),
                sqlstate=refusal.sqlstate,
                attempts=delivery_attempts(delivery),
            )
        )

    def log_parked(self, item: Item, refusal: Refusal, outcome: str) -> None:
        kept = {
            "parked": "parked",
            "parked_again": "parked",
            "over_cap": "not stored: the cap of parked messages is reached",
        }.get(outcome, outcome)
        logger.error(
            "Rejected %s from %s (delivery tag %d, routing key %s), %s: %s",
            item.what,
            self.queue,
            item.delivery.delivery_tag,
            one_line(item.delivery.routing_key),
            kept,
            one_line(refusal.reason),
            extra={
                "queue": self.queue,
                "delivery_tag": item.delivery.delivery_tag,
                "message_type": item.delivery.properties.type,
                "debtor_id": item.debtor_id,
                "creditor_id": item.creditor_id,
                "reason_code": refusal.code,
                "sqlstate": refusal.sqlstate,
            },
        )


def run_closed(conn: psycopg.Connection, calls: list[SqlCall], closing: Closing | None) -> list[tuple | None]:
    """`calls`, then `closing` if any, in one transaction; the first row of each of `calls`."""
    if closing is None:
        return execute_calls(conn, calls)
    rows = execute_calls(conn, [*calls, closing.call])
    closing.row = rows[-1]
    return rows[:-1]
