"""Decoding and validation of incoming SMP and chore messages (spec 01 §1, §5, §6.4).

Pure functions, no I/O. `decode()` turns an AMQP delivery (content type, type
property, body) into a frozen dataclass, or raises `InvalidMessage` whose text
is the log line of the consumer outcome table (spec 01 §3.6). The consumer
rejects such a message without requeue; anything else it raises is a bug.

The rules reproduce what the reference accepts and rejects, quirks included
(lenient integers, Python `$` regex semantics, the date-time grammar), except
where the reference would accept a message and then fail on it forever (a
"poison message"): those are validation errors here, each marked FIX below.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any, ClassVar

from pyswpt.sharding import MAX_INT64, MIN_INT64, i64_from_u64

# Spec 01 §0.2 and §1.
MIN_INT32 = -(2**31)
MAX_INT32 = 2**31 - 1
TRANSFER_NOTE_MAX_BYTES = 500
CONFIG_DATA_MAX_BYTES = 2000
ACCOUNT_ID_MAX_BYTES = 100
COORDINATOR_TYPE_MAX_BYTES = 30
IRI_MAX_LENGTH = 200
CONTENT_TYPE_MAX_BYTES = 100
INTEREST_RATE_FLOOR = -50.0
INTEREST_RATE_CEIL = 100.0

# Used with `re.match`, so a value with one trailing "\n" also matches (quirk kept).
TRANSFER_NOTE_FORMAT_PATTERN = re.compile(r"^[0-9A-Za-z.-]{0,8}$")
DEBTOR_INFO_SHA256_PATTERN = re.compile(r"^([0-9A-F]{64}|[0-9a-f]{64})?$")

# The date-time grammar of spec 01 §1.1, anchored like `re.match` + `$`: a
# trailing "\n" is accepted. `\d` also matches non-ASCII decimal digits, as in
# the reference. A fraction is allowed only after seconds; digits past the
# sixth are dropped.
DATETIME_PATTERN = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{1,2})-(?P<day>\d{1,2})"
    r"[T ](?P<hour>\d{1,2}):(?P<minute>\d{1,2})"
    r"(?::(?P<second>\d{1,2})(?:\.(?P<fraction>\d{1,6})\d{0,6})?)?"
    r"(?P<zone>Z|[+-]\d{2}(?::?\d{2})?)?$"
)
# What Python's datetime can carry, hence the flusher and the fetch API: a
# date-time outside this range once in UTC is refused (see parse_datetime).
DATETIME_RANGE_ERROR = f"Must be between {dt.datetime.min.isoformat()}Z and {dt.datetime.max.isoformat()}Z in UTC."

CONTENT_TYPE_JSON = "application/json"
INVALID_JSON_REASON = "The message does not contain a valid JSON document."


class InvalidMessage(Exception):
    """A message to reject without requeue; `str()` is the line to log."""


class _FieldError(Exception):
    """One reason why a field value is not valid."""


# ---------------------------------------------------------------------------
# Field rules. Each converts a JSON value to a Python value or raises _FieldError.


@dataclasses.dataclass(frozen=True)
class _Int:
    """A lenient integer (spec 01 §1.1): floats truncated, numeric strings parsed."""

    min_value: int = MIN_INT64
    max_value: int = MAX_INT64

    def load(self, value: Any) -> int:
        number = lenient_int(value)
        _check_range(number, self.min_value, self.max_value)
        return number


@dataclasses.dataclass(frozen=True)
class _Float:
    """A finite float; numbers and numeric strings accepted, booleans rejected."""

    min_value: float | None = None
    max_value: float | None = None
    # FIX: `negligible_amount` goes into a PostgreSQL `real` column. The
    # reference accepts values that do not fit and then fails on every insert,
    # so the message is redelivered forever. Here they are validation errors.
    fits_float32: bool = False

    def load(self, value: Any) -> float:
        number = lenient_float(value)
        if self.min_value is not None or self.max_value is not None:
            _check_range(number, self.min_value, self.max_value)
        if self.fits_float32 and not fits_float32(number):
            raise _FieldError("Does not fit in a single-precision float.")
        return number


@dataclasses.dataclass(frozen=True)
class _Text:
    """A JSON string with limits in characters and/or UTF-8 bytes."""

    min_chars: int = 0
    max_chars: int | None = None
    max_bytes: int | None = None
    ascii_only: bool = False
    pattern: re.Pattern[str] | None = None
    # Only `recipient` is never stored as text (it is parsed); a NUL in it
    # makes the recipient unreachable, as in the reference.
    allow_nul: bool = False

    def load(self, value: Any) -> str:
        if not isinstance(value, str):
            raise _FieldError("Not a valid string.")
        _check_storable(value, self.allow_nul)
        if len(value) < self.min_chars or (self.max_chars is not None and len(value) > self.max_chars):
            raise _FieldError(_length_message(self.min_chars, self.max_chars))
        if self.max_bytes is not None and len(value.encode("utf-8")) > self.max_bytes:
            raise _FieldError(f"Longer than {self.max_bytes} bytes in UTF-8.")
        if self.ascii_only and not value.isascii():
            raise _FieldError("Must contain only ASCII characters.")
        if self.pattern is not None and self.pattern.match(value) is None:
            raise _FieldError("String does not match expected pattern.")
        return value


@dataclasses.dataclass(frozen=True)
class _DateTime:
    """A date-time of the spec 01 §1.1 grammar, returned in UTC."""

    def load(self, value: Any) -> dt.datetime:
        try:
            return parse_datetime(value)
        except (TypeError, ValueError) as error:
            raise _FieldError("Not a valid datetime.") from error
        except OverflowError as error:
            raise _FieldError(DATETIME_RANGE_ERROR) from error


_Rule = _Int | _Float | _Text | _DateTime


def _check_range(number: float, min_value: float | None, max_value: float | None) -> None:
    if (min_value is not None and number < min_value) or (max_value is not None and number > max_value):
        if max_value is None:
            raise _FieldError(f"Must be greater than or equal to {min_value}.")
        if min_value is None:
            raise _FieldError(f"Must be less than or equal to {max_value}.")
        raise _FieldError(f"Must be greater than or equal to {min_value} and less than or equal to {max_value}.")


def _length_message(min_chars: int, max_chars: int | None) -> str:
    if max_chars is None:
        return f"Shorter than minimum length {min_chars}."
    if min_chars == 0:
        return f"Longer than maximum length {max_chars}."
    return f"Length must be between {min_chars} and {max_chars}."


def _check_storable(value: str, allow_nul: bool) -> None:
    # FIX: PostgreSQL text cannot hold U+0000, and an unpaired surrogate (which
    # JSON's "\ud800" escape produces) cannot be encoded as UTF-8. The reference
    # accepts both and then fails on every attempt to store or measure them.
    if not allow_nul and "\x00" in value:
        raise _FieldError("Must not contain the NUL character.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _FieldError("Must not contain unpaired surrogates.") from error


def lenient_int(value: Any) -> int:
    """Python `int()` on a JSON value, booleans excluded (spec 01 §1.1 quirk)."""
    if value is True or value is False:
        raise _FieldError("Not a valid integer.")
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise _FieldError("Not a valid integer.") from error
    except OverflowError as error:
        raise _FieldError("Number too large.") from error


def lenient_float(value: Any) -> float:
    """Python `float()` on a JSON value; booleans, NaN and infinities excluded."""
    if value is True or value is False:
        raise _FieldError("Not a valid number.")
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise _FieldError("Not a valid number.") from error
    except OverflowError as error:
        raise _FieldError("Number too large.") from error
    if not math.isfinite(number):
        raise _FieldError("Special numeric values (nan or infinity) are not permitted.")
    return number


def fits_float32(number: float) -> bool:
    """Whether PostgreSQL's float8 → real conversion accepts `number`.

    It refuses a finite value that rounds to infinity (overflow) or a non-zero
    value that rounds to zero (underflow); anything else is rounded.
    """
    try:
        single = struct.unpack(">f", struct.pack(">f", number))[0]
    except OverflowError:
        return False
    return not (single == 0.0 and number != 0.0)


def parse_datetime(value: Any) -> dt.datetime:
    """A date-time of the spec 01 §1.1 grammar, converted to UTC.

    FIX: a value without a zone is taken as UTC. The reference yields a naive
    datetime, and its ConfigureAccount handler then fails on every delivery
    comparing it with aware ones (a poison message); PrepareTransfer stored it
    in the database session zone, which is UTC in every standard deployment.

    FIX: the instant must lie within Python's datetime range once in UTC, or
    OverflowError is raised. The reference keeps the sender's offset, so
    "9999-12-31T23:59:59-23:59" (in year 10000 in UTC) is stored; PostgreSQL
    holds it, but no row holding it can be read back into Python again.
    """
    match = DATETIME_PATTERN.match(value)
    if match is None:
        raise ValueError(f"not a date-time: {value!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    moment = dt.datetime(
        int(year),
        int(month),
        int(day),
        int(hour),
        int(minute),
        0 if second is None else int(second),
        0 if fraction is None else int(fraction.ljust(6, "0")),
        tzinfo=_parse_zone(zone),
    )
    return moment.astimezone(dt.UTC)


def _parse_zone(zone: str | None) -> dt.tzinfo:
    if zone is None or zone == "Z":
        return dt.UTC
    # "+HH", "+HHMM" or "+HH:MM"; minutes are not range-checked beyond what
    # `timezone` allows (strictly less than a day), as in the reference.
    minutes = 60 * int(zone[1:3]) + (int(zone[-2:]) if len(zone) > 3 else 0)
    return dt.timezone(dt.timedelta(minutes=-minutes if zone[0] == "-" else minutes))


def _rule(rule: _Rule) -> Any:
    return dataclasses.field(metadata={"rule": rule})


_I64 = _Int()
_I32 = _Int(MIN_INT32, MAX_INT32)
_AMOUNT = _Int(0, MAX_INT64)
_DATETIME = _DateTime()
_TYPE = _Text()
_COORDINATOR_TYPE = _Text(min_chars=1, max_chars=COORDINATOR_TYPE_MAX_BYTES, ascii_only=True)
_TRANSFER_NOTE_FORMAT = _Text(pattern=TRANSFER_NOTE_FORMAT_PATTERN)
_TRANSFER_NOTE = _Text(max_chars=TRANSFER_NOTE_MAX_BYTES, max_bytes=TRANSFER_NOTE_MAX_BYTES)


# ---------------------------------------------------------------------------
# Messages of the SMP queue (spec 01 §1.2–1.5).


@dataclasses.dataclass(frozen=True)
class ConfigureAccount:
    TYPE: ClassVar[str] = "ConfigureAccount"

    debtor_id: int = _rule(_I64)
    creditor_id: int = _rule(_I64)
    negligible_amount: float = _rule(_Float(min_value=0.0, fits_float32=True))
    config_data: str = _rule(_Text(max_chars=CONFIG_DATA_MAX_BYTES, max_bytes=CONFIG_DATA_MAX_BYTES))
    config_flags: int = _rule(_I32)
    seqnum: int = _rule(_I32)
    ts: dt.datetime = _rule(_DATETIME)


@dataclasses.dataclass(frozen=True)
class PrepareTransfer:
    TYPE: ClassVar[str] = "PrepareTransfer"

    debtor_id: int = _rule(_I64)
    creditor_id: int = _rule(_I64)
    coordinator_type: str = _rule(_COORDINATOR_TYPE)
    coordinator_id: int = _rule(_I64)
    coordinator_request_id: int = _rule(_I64)
    min_locked_amount: int = _rule(_AMOUNT)
    max_locked_amount: int = _rule(_AMOUNT)
    recipient: str = _rule(_Text(max_chars=ACCOUNT_ID_MAX_BYTES, ascii_only=True, allow_nul=True))
    final_interest_rate_ts: dt.datetime = _rule(_DATETIME)
    max_commit_delay: int = _rule(_Int(0, MAX_INT32))
    ts: dt.datetime = _rule(_DATETIME)

    def cross_field_errors(self) -> dict[str, list[str]]:
        errors: dict[str, list[str]] = {}
        if self.min_locked_amount > self.max_locked_amount:
            errors["max_locked_amount"] = ["Must be greater than or equal to min_locked_amount."]
        if self.coordinator_type == "direct" and self.coordinator_id != self.creditor_id:
            errors["coordinator_id"] = ["Must equal creditor_id for direct transfers."]
        if self.coordinator_type == "issuing":
            if self.coordinator_id != self.debtor_id:
                errors["coordinator_id"] = ["Must equal debtor_id for issuing transfers."]
            if self.creditor_id != 0:
                errors["creditor_id"] = ["Must be 0 for issuing transfers."]
        return errors


@dataclasses.dataclass(frozen=True)
class FinalizeTransfer:
    TYPE: ClassVar[str] = "FinalizeTransfer"

    debtor_id: int = _rule(_I64)
    creditor_id: int = _rule(_I64)
    transfer_id: int = _rule(_I64)
    coordinator_type: str = _rule(_COORDINATOR_TYPE)
    coordinator_id: int = _rule(_I64)
    coordinator_request_id: int = _rule(_I64)
    committed_amount: int = _rule(_AMOUNT)
    transfer_note_format: str = _rule(_TRANSFER_NOTE_FORMAT)
    transfer_note: str = _rule(_TRANSFER_NOTE)
    ts: dt.datetime = _rule(_DATETIME)


@dataclasses.dataclass(frozen=True)
class PendingBalanceChange:
    TYPE: ClassVar[str] = "PendingBalanceChange"

    debtor_id: int = _rule(_I64)
    creditor_id: int = _rule(_I64)
    change_id: int = _rule(_I64)
    coordinator_type: str = _rule(_COORDINATOR_TYPE)
    transfer_note_format: str = _rule(_TRANSFER_NOTE_FORMAT)
    transfer_note: str = _rule(_TRANSFER_NOTE)
    committed_at: dt.datetime = _rule(_DATETIME)
    principal_delta: int = _rule(_Int(-MAX_INT64, MAX_INT64))
    other_creditor_id: int = _rule(_I64)

    def cross_field_errors(self) -> dict[str, list[str]]:
        if self.principal_delta == 0:
            return {"principal_delta": ["Must not be 0."]}
        return {}


# ---------------------------------------------------------------------------
# Messages of the chores queue (spec 01 §5).


@dataclasses.dataclass(frozen=True)
class ChangeInterestRate:
    TYPE: ClassVar[str] = "ChangeInterestRate"

    debtor_id: int = _rule(_I64)
    creditor_id: int = _rule(_I64)
    interest_rate: float = _rule(_Float())
    ts: dt.datetime = _rule(_DATETIME)


@dataclasses.dataclass(frozen=True)
class UpdateDebtorInfo:
    TYPE: ClassVar[str] = "UpdateDebtorInfo"

    debtor_id: int = _rule(_I64)
    creditor_id: int = _rule(_I64)
    debtor_info_iri: str = _rule(_Text(max_chars=IRI_MAX_LENGTH))
    debtor_info_content_type: str = _rule(_Text(max_chars=CONTENT_TYPE_MAX_BYTES, ascii_only=True))
    debtor_info_sha256: str = _rule(_Text(pattern=DEBTOR_INFO_SHA256_PATTERN))
    ts: dt.datetime = _rule(_DATETIME)


@dataclasses.dataclass(frozen=True)
class CapitalizeInterest:
    TYPE: ClassVar[str] = "CapitalizeInterest"

    debtor_id: int = _rule(_I64)
    creditor_id: int = _rule(_I64)


@dataclasses.dataclass(frozen=True)
class TryToDeleteAccount:
    TYPE: ClassVar[str] = "TryToDeleteAccount"

    debtor_id: int = _rule(_I64)
    creditor_id: int = _rule(_I64)


SmpMessage = ConfigureAccount | PrepareTransfer | FinalizeTransfer | PendingBalanceChange
Chore = ChangeInterestRate | UpdateDebtorInfo | CapitalizeInterest | TryToDeleteAccount
Message = SmpMessage | Chore
Kinds = Mapping[str, type]

# What each consumer accepts, by AMQP `type` property.
SMP_KINDS: Kinds = {
    cls.TYPE: cls for cls in (ConfigureAccount, PrepareTransfer, FinalizeTransfer, PendingBalanceChange)
}
CHORE_KINDS: Kinds = {
    cls.TYPE: cls for cls in (ChangeInterestRate, UpdateDebtorInfo, CapitalizeInterest, TryToDeleteAccount)
}


# ---------------------------------------------------------------------------
# Entry point.


def decode(content_type: str | None, message_type: str | None, body: bytes, kinds: Kinds) -> Message:
    """The message of one delivery, checked in the order of spec 01 §3.6."""
    if content_type != CONTENT_TYPE_JSON:
        raise InvalidMessage(f'Unknown message content type: "{content_type}"')
    kind = kinds.get(message_type) if isinstance(message_type, str) else None
    if kind is None:
        raise InvalidMessage(f'Unknown message type: "{message_type}"')
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError and integers longer than Python's
        # digit limit; RecursionError absurdly deep nesting.
        raise InvalidMessage(INVALID_JSON_REASON) from error
    message, errors = _load(kind, message_type, document)
    if errors:
        raise InvalidMessage(f"Message validation error: {errors}")
    assert message is not None
    return message


def _load(kind: Any, message_type: str, document: Any) -> tuple[Message | None, dict[str, list[str]]]:
    """The message and no errors, or None and the errors by field name."""
    if not isinstance(document, dict):
        return None, {"_schema": ["Invalid input type."]}
    errors: dict[str, list[str]] = {}
    try:
        if _TYPE.load(_required(document, "type")) != message_type:
            errors["type"] = ["Invalid type."]
    except _FieldError as error:
        errors["type"] = [str(error)]
    values: dict[str, Any] = {}
    for name, rule in _rules(kind):
        try:
            values[name] = rule.load(_required(document, name))
        except _FieldError as error:
            errors[name] = [str(error)]
    if errors:
        return None, errors
    message = kind(**values)
    # Cross-field rules run only on fields that are valid one by one.
    cross_field_errors = getattr(message, "cross_field_errors", None)
    errors = cross_field_errors() if cross_field_errors is not None else {}
    return (None, errors) if errors else (message, {})


@functools.cache
def _rules(kind: type) -> tuple[tuple[str, _Rule], ...]:
    """The name and rule of each field of a message class, in order (asked once per class:
    dataclasses.fields() builds its tuple anew at every call)."""
    return tuple((field.name, field.metadata["rule"]) for field in dataclasses.fields(kind))


def _required(document: dict[str, Any], name: str) -> Any:
    if name not in document:
        raise _FieldError("Missing data for required field.")
    value = document[name]
    if value is None:
        raise _FieldError("Field may not be null.")
    return value


# ---------------------------------------------------------------------------
# Recipient (spec 01 §1.3). RootConfigData is parsed in SQL (parse_root_config),
# where the ledger uses it.


def parse_recipient(text: str) -> int | None:
    """The creditor id a PrepareTransfer `recipient` names, or None if unreachable.

    Python `int()` leniency (spec 01 §1.3 quirk): whitespace, a leading `+`,
    leading zeros and `_` separators are accepted. The number is a u64.
    """
    try:
        number = int(text)
    except ValueError:
        return None
    try:
        return i64_from_u64(number)
    except ValueError:
        return None
