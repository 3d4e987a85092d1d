"""Parking: setting aside a message that cannot be applied or published (issue 8).

A parked message is stored in PostgreSQL (pyswpt.parked_message) with its
reason, so that it is neither lost nor retried in a loop; operators list,
replay and discard parked messages with `pyswpt parked`. The same message
parked twice (a redelivery after a crash) updates its row. Past
MAX_PARKED_PER_REASON rows for one source and reason only a count is kept,
so a flooding peer cannot fill the disk.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pyswpt import queries
from pyswpt.transactions import SqlCall

MAX_PARKED_PER_REASON = 10_000
# Reasons are one log line; a long database message is cut here.
REASON_MAX_CHARS = 500

SOURCE_QUEUE = "queue"
SOURCE_OUTBOX = "outbox"


@dataclasses.dataclass(frozen=True)
class Parcel:
    """One message to park, with where it came from and why it is set aside."""

    source_kind: str  # SOURCE_QUEUE or SOURCE_OUTBOX
    source_name: str  # the queue, or the outbox table
    routing_key: str
    reason_code: str  # a short class: invalid, foreign_shard, refused, ...
    reason: str  # one line, never message contents
    body: bytes | None = None
    row_data: Mapping[str, str | None] | None = None
    exchange: str | None = None
    message_type: str | None = None
    content_type: str | None = None
    headers: Mapping[str, Any] | None = None
    debtor_id: int | None = None
    creditor_id: int | None = None
    sqlstate: str | None = None
    attempts: int = 1
    next_retry_at: dt.datetime | None = None


def park_call(parcel: Parcel) -> SqlCall:
    """The SQL call that parks `parcel`; its result is 'parked', 'parked_again' or 'over_cap'."""
    return SqlCall(
        queries.PARK_MESSAGE,
        {
            "source_kind": parcel.source_kind,
            "source_name": parcel.source_name,
            "exchange": storable(parcel.exchange),
            "routing_key": storable(parcel.routing_key),
            "message_type": storable(parcel.message_type),
            "content_type": storable(parcel.content_type),
            "headers": None if parcel.headers is None else Jsonb(json_safe(parcel.headers)),
            "body": parcel.body,
            "row_data": None if parcel.row_data is None else Jsonb(dict(parcel.row_data)),
            "debtor_id": parcel.debtor_id,
            "creditor_id": parcel.creditor_id,
            "reason_code": parcel.reason_code,
            "reason": storable(parcel.reason[:REASON_MAX_CHARS]),
            "sqlstate": parcel.sqlstate,
            "attempts": parcel.attempts,
            "next_retry_at": parcel.next_retry_at,
            "max_per_reason": MAX_PARKED_PER_REASON,
        },
    )


def park(conn: psycopg.Connection, parcel: Parcel) -> str:
    """Park `parcel` in the caller's transaction; return what park_message said."""
    call = park_call(parcel)
    return conn.execute(call.query, call.params).fetchone()[0]


def json_safe(value: Any) -> Any:
    """AMQP headers as JSON: values JSON cannot hold (bytes, decimals, dates) become text.

    jsonb refuses NUL in strings, so strings (keys too) go through storable().
    """
    if isinstance(value, Mapping):
        return {storable(str(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if value is None or isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return storable(value if isinstance(value, str) else str(value))


def storable(text: str | None) -> str | None:
    """`text` as PostgreSQL can store it: a peer may put NUL, which text columns refuse, in any string."""
    return None if text is None else text.replace("\x00", "\ufffd")
