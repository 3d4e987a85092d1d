"""Serialization of outgoing messages: bodies, AMQP properties, destinations.

Spec 01 §2 (JSON), §3.1 (properties), §3.2 (exchanges and routing keys),
§3.4 (mandatory flag) and §5 (chores). Pure functions, no I/O.
"""

from __future__ import annotations

import datetime as dt
import fractions
import json
import math
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import pika

from pyswpt.flags import CONFIG_SCHEDULED_FOR_DELETION
from pyswpt.sharding import binary_routing_key, hex_routing_key

CONTENT_TYPE = "application/json"
APP_ID = "swpt_accounts"
PERSISTENT_DELIVERY_MODE = 2
ROOT_CREDITOR_ID = 0

TO_CREDITORS_EXCHANGE = "to_creditors"
TO_DEBTORS_EXCHANGE = "to_debtors"
TO_COORDINATORS_EXCHANGE = "to_coordinators"
ACCOUNTS_IN_EXCHANGE = "accounts_in"
DEFAULT_EXCHANGE = ""

# Routed to the creditor, or to the debtor when the account is the root account.
ACCOUNT_MESSAGE_TYPES = frozenset({"RejectedConfig", "AccountUpdate", "AccountPurge"})
COORDINATOR_MESSAGE_TYPES = frozenset({"RejectedTransfer", "PreparedTransfer", "FinalizedTransfer"})

# Fields stored in PostgreSQL `real` columns (spec 01 §2.1). The reference
# reads them back as PostgreSQL's shortest float32 text, so 123456789.0 is sent
# as 123456790.0; `smp_body` applies the same rounding, which is idempotent.
FLOAT32_FIELDS = frozenset({"negligible_amount", "interest_rate"})
# Fields where "no value" is written as the empty string (AccountUpdate, UpdateDebtorInfo).
EMPTY_WHEN_NONE_FIELDS = frozenset({"debtor_info_iri", "debtor_info_content_type", "debtor_info_sha256"})
FLOAT32_MAX_SIGNIFICANT_DIGITS = 9


# json.dumps() with other than its default options builds an encoder at every call.
_SMP_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# The types of values that are their own JSON form, as most fields' are.
_AS_THEY_ARE = frozenset({int, str})


class Destination(NamedTuple):
    exchange: str
    routing_key: str
    mandatory: bool


def smp_body(fields: Mapping[str, Any]) -> bytes:
    """The body of an outgoing SMP message: compact JSON, non-ASCII raw (spec 01 §2.1).

    Keys keep the mapping's order. Raises ValueError/TypeError for a value the
    spec has no JSON form for (NaN, infinity, a naive datetime, null).
    """
    document = {name: _json_value(name, value, FLOAT32_FIELDS) for name, value in fields.items()}
    return _SMP_JSON.encode(document).encode("utf-8")


def chore_body(fields: Mapping[str, Any]) -> bytes:
    """The body of a chore: Python's default JSON formatting (spec 01 §2.1, §5).

    Its `interest_rate` is a target from RootConfigData, a double: not rounded.
    """
    document = {name: _json_value(name, value, frozenset()) for name, value in fields.items()}
    return json.dumps(document, allow_nan=False).encode("utf-8")


def _json_value(name: str, value: Any, float32_fields: frozenset[str]) -> Any:
    if type(value) in _AS_THEY_ARE:  # first, as the most common (a bool's type is bool, not int)
        return value
    if value is None:
        if name in EMPTY_WHEN_NONE_FIELDS:
            return ""
        raise ValueError(f"{name} has no value")
    if isinstance(value, bool):
        raise TypeError(f"{name}: no SMP field is a boolean")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name}: {value} has no JSON form")
        return float32_rounded(value) if name in float32_fields else value
    if isinstance(value, (int, str)):
        return value
    if isinstance(value, dt.datetime):
        return format_datetime(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex().upper()
    raise TypeError(f"{name}: no JSON form for {type(value).__name__}")


def format_datetime(value: dt.datetime) -> str:
    """ISO 8601 in UTC: `T`, microseconds only when non-zero, `+00:00` (never `Z`)."""
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: the instant is unknown")
    return value.astimezone(dt.UTC).isoformat()


def float32_rounded(value: float) -> float:
    """`value` as PostgreSQL prints it from a `real` column, parsed back as a double.

    PostgreSQL prints the shortest decimal lying strictly inside the interval of
    numbers that round to the same float32 (its Ryu variant excludes the
    interval's bounds), the closest one when several have that length.
    Raises OverflowError when `value` does not fit a float32.
    """
    single = _to_float32(value)
    if single == 0.0:
        return single
    exact = fractions.Fraction(abs(single))
    low, high = _float32_rounding_interval(abs(single))
    # The power of ten of the leading digit: 10**lead <= exact < 10**(lead + 1).
    lead = math.floor(math.log10(exact))
    lead += 1 if exact >= fractions.Fraction(10) ** (lead + 1) else 0
    lead -= 1 if exact < fractions.Fraction(10) ** lead else 0
    for digits in range(1, FLOAT32_MAX_SIGNIFICANT_DIGITS + 1):
        unit = fractions.Fraction(10) ** (lead - digits + 1)
        nearest = round(exact / unit)  # ties to even, as Ryu does
        inside = [n for n in (nearest, nearest - 1, nearest + 1) if low < n * unit < high]
        if inside:
            best = min(inside, key=lambda n: abs(n * unit - exact))
            return math.copysign(float(best * unit), single)
    raise AssertionError(f"nine significant digits always identify a float32: {value!r}")


def _float32_rounding_interval(single: float) -> tuple[fractions.Fraction, fractions.Fraction]:
    """The open interval of reals that round to the positive float32 `single`."""
    bits = struct.unpack(">I", struct.pack(">f", single))[0]
    exponent_bits, mantissa_bits = bits >> 23, bits & 0x7FFFFF
    ulp = fractions.Fraction(2) ** (max(exponent_bits, 1) - 150)
    # Just above a power of two, the float32 below is half as far away.
    gap_below = ulp / 2 if mantissa_bits == 0 and exponent_bits > 1 else ulp
    exact = fractions.Fraction(single)
    return exact - gap_below / 2, exact + ulp / 2


def _to_float32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


def smp_properties(message_type: str, fields: Mapping[str, Any]) -> pika.BasicProperties:
    """Properties of an outgoing SMP message (spec 01 §3.1)."""
    if fields.get("type", message_type) != message_type:
        raise ValueError(f"body type {fields['type']!r} is not {message_type!r}")
    headers: dict[str, Any] = {
        "message-type": message_type,
        "debtor-id": fields["debtor_id"],
        "creditor-id": fields["creditor_id"],
    }
    # The headers exchange `to_coordinators` routes on these; only the three
    # transfer replies carry `coordinator_id`, and only they get them.
    if "coordinator_id" in fields:
        headers["coordinator-id"] = fields["coordinator_id"]
        headers["coordinator-type"] = fields["coordinator_type"]
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        type=message_type,
        delivery_mode=PERSISTENT_DELIVERY_MODE,
        app_id=APP_ID,
        headers=headers,
    )


def chore_properties(message_type: str) -> pika.BasicProperties:
    """Properties of a chore message: no headers (spec 01 §5)."""
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        type=message_type,
        delivery_mode=PERSISTENT_DELIVERY_MODE,
        app_id=APP_ID,
    )


def destination(message_type: str, fields: Mapping[str, Any]) -> Destination:
    """Exchange, routing key and mandatory flag of an outgoing SMP message (spec 01 §3.2, §3.4)."""
    debtor_id = fields["debtor_id"]
    creditor_id = fields["creditor_id"]
    if message_type in ACCOUNT_MESSAGE_TYPES:
        if creditor_id == ROOT_CREDITOR_ID:
            # A decommissioned debtor may have no queue any more: its heartbeats
            # may be dropped silently.
            scheduled_for_deletion = bool(fields.get("config_flags", 0) & CONFIG_SCHEDULED_FOR_DELETION)
            mandatory = not (message_type == "AccountUpdate" and scheduled_for_deletion)
            return Destination(TO_DEBTORS_EXCHANGE, hex_routing_key(debtor_id), mandatory)
        return Destination(TO_CREDITORS_EXCHANGE, hex_routing_key(creditor_id), True)
    if message_type == "AccountTransfer":
        return Destination(TO_CREDITORS_EXCHANGE, hex_routing_key(creditor_id), True)
    if message_type in COORDINATOR_MESSAGE_TYPES:
        return Destination(TO_COORDINATORS_EXCHANGE, hex_routing_key(fields["coordinator_id"]), True)
    if message_type == "PendingBalanceChange":
        return Destination(ACCOUNTS_IN_EXCHANGE, binary_routing_key(debtor_id, creditor_id), True)
    raise ValueError(f"unknown outgoing message type {message_type!r}")


def chore_destination(chores_queue: str) -> Destination:
    """Chores go straight to their queue through the default exchange (spec 01 §3.2, §3.4)."""
    return Destination(DEFAULT_EXCHANGE, chores_queue, True)
