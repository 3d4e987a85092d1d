"""Incoming messages: decoding and validation (spec 01 §1, §3.6, §5, §6.4)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyswpt import messages
from pyswpt.messages import (
    CHORE_KINDS,
    SMP_KINDS,
    InvalidMessage,
    parse_recipient,
)

JSON = "application/json"
UTC = dt.UTC
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
SHA256_UPPER = "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F"
TS = "2024-05-20T10:15:30.123456+00:00"
TS_VALUE = dt.datetime(2024, 5, 20, 10, 15, 30, 123456, tzinfo=UTC)

VALID: dict[str, dict[str, Any]] = {
    "ConfigureAccount": {
        "type": "ConfigureAccount",
        "debtor_id": -2,
        "creditor_id": 1099511627778,
        "negligible_amount": 0.0,
        "config_data": "",
        "config_flags": 0,
        "seqnum": 1,
        "ts": TS,
    },
    "PrepareTransfer": {
        "type": "PrepareTransfer",
        "debtor_id": -2,
        "creditor_id": 1099511627778,
        "coordinator_type": "direct",
        "coordinator_id": 1099511627778,
        "coordinator_request_id": 43,
        "min_locked_amount": 1000,
        "max_locked_amount": 1000,
        "recipient": "1099511627781",
        "final_interest_rate_ts": "9999-12-31T23:59:59+00:00",
        "max_commit_delay": 2147483647,
        "ts": TS,
    },
    "FinalizeTransfer": {
        "type": "FinalizeTransfer",
        "debtor_id": -2,
        "creditor_id": 1099511627778,
        "transfer_id": 21838499950886915,
        "coordinator_type": "direct",
        "coordinator_id": 1099511627778,
        "coordinator_request_id": 43,
        "committed_amount": 900,
        "transfer_note_format": "",
        "transfer_note": "Hello, Мир",
        "ts": TS,
    },
    "PendingBalanceChange": {
        "type": "PendingBalanceChange",
        "debtor_id": -2,
        "creditor_id": 1099511627781,
        "change_id": 77,
        "coordinator_type": "direct",
        "transfer_note_format": "",
        "transfer_note": "Hello, Мир",
        "committed_at": TS,
        "principal_delta": 900,
        "other_creditor_id": 1099511627778,
    },
    "ChangeInterestRate": {
        "type": "ChangeInterestRate",
        "debtor_id": -2,
        "creditor_id": 1099511627778,
        "interest_rate": 2.5,
        "ts": TS,
    },
    "UpdateDebtorInfo": {
        "type": "UpdateDebtorInfo",
        "debtor_id": -2,
        "creditor_id": 1099511627778,
        "debtor_info_iri": "https://example.com/debtors/ü",
        "debtor_info_content_type": "text/html",
        "debtor_info_sha256": SHA256_UPPER,
        "ts": TS,
    },
    "CapitalizeInterest": {"type": "CapitalizeInterest", "debtor_id": -2, "creditor_id": 1099511627778},
    "TryToDeleteAccount": {"type": "TryToDeleteAccount", "debtor_id": -2, "creditor_id": 0},
}
CHORE_TYPES = {"ChangeInterestRate", "UpdateDebtorInfo", "CapitalizeInterest", "TryToDeleteAccount"}


def _kinds(message_type: str) -> messages.Kinds:
    return CHORE_KINDS if message_type in CHORE_TYPES else SMP_KINDS


def decode(message_type: str, **changes: Any) -> Any:
    """Decode a valid message of `message_type` with some fields changed (`...` removes one)."""
    document = {**VALID[message_type], **changes}
    document = {name: value for name, value in document.items() if value is not ...}
    return messages.decode(JSON, message_type, json.dumps(document).encode(), _kinds(message_type))


def rejection(message_type: str, **changes: Any) -> str:
    with pytest.raises(InvalidMessage) as caught:
        decode(message_type, **changes)
    return str(caught.value)


def field_rejected(message_type: str, field: str, value: Any) -> bool:
    reason = rejection(message_type, **{field: value})
    return reason.startswith("Message validation error: ") and repr(field) in reason


def fields_of_type(annotation: str) -> list[tuple[str, str]]:
    """(message type, field) of every field annotated with `annotation`."""
    return [
        (message_type, field.name)
        for message_type, kind in {**SMP_KINDS, **CHORE_KINDS}.items()
        for field in dataclasses.fields(kind)
        if field.type == annotation
    ]


# --- the outcome table of spec 01 §3.6 ------------------------------------------


@pytest.mark.parametrize("message_type", VALID)
def test_valid_message_of_each_type_decodes(message_type: str) -> None:
    message = decode(message_type)
    assert type(message).__name__ == message_type


def test_decoded_message_has_typed_values() -> None:
    assert decode("ConfigureAccount") == messages.ConfigureAccount(
        debtor_id=-2,
        creditor_id=1099511627778,
        negligible_amount=0.0,
        config_data="",
        config_flags=0,
        seqnum=1,
        ts=TS_VALUE,
    )


def test_decoded_message_is_frozen() -> None:
    message = decode("CapitalizeInterest")
    with pytest.raises(AttributeError):
        message.debtor_id = 5


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "text/plain", "APPLICATION/JSON"])
def test_content_type_other_than_exactly_json_is_rejected(content_type: str | None) -> None:
    body = json.dumps(VALID["ConfigureAccount"]).encode()
    with pytest.raises(InvalidMessage) as caught:
        messages.decode(content_type, "ConfigureAccount", body, SMP_KINDS)
    assert str(caught.value) == f'Unknown message content type: "{content_type}"'


def test_content_type_is_checked_before_message_type() -> None:
    with pytest.raises(InvalidMessage, match="content type"):
        messages.decode("text/plain", "Nonsense", b"", SMP_KINDS)


@pytest.mark.parametrize("message_type", [None, "AccountUpdate", "configureaccount", "ChangeInterestRate"])
def test_message_type_not_handled_by_the_smp_consumer_is_rejected(message_type: str | None) -> None:
    with pytest.raises(InvalidMessage) as caught:
        messages.decode(JSON, message_type, b"{}", SMP_KINDS)
    assert str(caught.value) == f'Unknown message type: "{message_type}"'


@pytest.mark.parametrize(
    "message_type", ["ConfigureAccount", "PrepareTransfer", "FinalizeTransfer", "PendingBalanceChange"]
)
def test_smp_message_type_is_rejected_by_the_chores_consumer(message_type: str) -> None:
    body = json.dumps(VALID[message_type]).encode()
    with pytest.raises(InvalidMessage, match=f'^Unknown message type: "{message_type}"$'):
        messages.decode(JSON, message_type, body, CHORE_KINDS)


@pytest.mark.parametrize(
    "body",
    [b"\xff{}", b"{", b"", b"{'type': 1}", "\ufeff{}".encode(), b"[" * 100000 + b"]" * 100000, b"1" * 5000],
    ids=["not-utf8", "truncated", "empty", "single-quotes", "bom", "deep-nesting", "huge-integer"],
)
def test_body_that_is_not_a_json_document_is_rejected(body: bytes) -> None:
    with pytest.raises(InvalidMessage) as caught:
        messages.decode(JSON, "ConfigureAccount", body, SMP_KINDS)
    assert str(caught.value) == "The message does not contain a valid JSON document."


@pytest.mark.parametrize("body", [b"[]", b"null", b'"ConfigureAccount"', b"42"])
def test_json_document_that_is_not_an_object_fails_validation(body: bytes) -> None:
    with pytest.raises(InvalidMessage) as caught:
        messages.decode(JSON, "ConfigureAccount", body, SMP_KINDS)
    assert str(caught.value) == "Message validation error: {'_schema': ['Invalid input type.']}"


def test_json_type_different_from_amqp_type_fails_validation() -> None:
    assert (
        rejection("ConfigureAccount", type="PrepareTransfer") == "Message validation error: {'type': ['Invalid type.']}"
    )


@pytest.mark.parametrize("value", [..., None, 1])
def test_json_type_missing_null_or_not_a_string_fails_validation(value: Any) -> None:
    assert field_rejected("ConfigureAccount", "type", value)


@pytest.mark.parametrize("field", [name for name in VALID["PrepareTransfer"] if name != "type"])
def test_every_field_is_required(field: str) -> None:
    assert rejection("PrepareTransfer", **{field: ...}) == (
        f"Message validation error: {{{field!r}: ['Missing data for required field.']}}"
    )


@pytest.mark.parametrize("field", [name for name in VALID["FinalizeTransfer"] if name != "type"])
def test_null_is_never_allowed(field: str) -> None:
    assert rejection("FinalizeTransfer", **{field: None}) == (
        f"Message validation error: {{{field!r}: ['Field may not be null.']}}"
    )


def test_unknown_fields_are_dropped() -> None:
    assert decode("CapitalizeInterest", extra=None, interest_rate="x") == messages.CapitalizeInterest(-2, 1099511627778)


def test_every_invalid_field_is_reported() -> None:
    reason = rejection("ConfigureAccount", debtor_id=True, seqnum=..., ts="yesterday")
    assert reason == (
        "Message validation error: {'debtor_id': ['Not a valid integer.'], "
        "'seqnum': ['Missing data for required field.'], 'ts': ['Not a valid datetime.']}"
    )


# --- lenient integers (spec 01 §1.1) ---------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5.9, 5), (-5.9, -5), (7.0, 7), ("42", 42), (" 42\n", 42), ("+42", 42), ("-42", -42), ("4_2", 42), ("007", 7)],
)
def test_integer_field_accepts_floats_truncated_and_numeric_strings(value: Any, expected: int) -> None:
    assert decode("ConfigureAccount", seqnum=value).seqnum == expected


@pytest.mark.parametrize("value", [True, False, "5.9", "0x10", "", "five", [1], {"n": 1}, "NaN"])
def test_integer_field_rejects_booleans_and_non_integers(value: Any) -> None:
    assert (
        rejection("ConfigureAccount", seqnum=value) == "Message validation error: {'seqnum': ['Not a valid integer.']}"
    )


def test_integer_field_rejects_nan_and_infinity() -> None:
    body = json.dumps(VALID["ConfigureAccount"]).replace('"seqnum": 1', '"seqnum": NaN').encode()
    with pytest.raises(InvalidMessage, match="seqnum"):
        messages.decode(JSON, "ConfigureAccount", body, SMP_KINDS)
    body = json.dumps(VALID["ConfigureAccount"]).replace('"seqnum": 1', '"seqnum": -Infinity').encode()
    with pytest.raises(InvalidMessage, match="Number too large"):
        messages.decode(JSON, "ConfigureAccount", body, SMP_KINDS)


@pytest.mark.parametrize("value", [MIN_INT64, MAX_INT64, str(MAX_INT64)])
def test_i64_field_accepts_its_extremes(value: Any) -> None:
    assert decode("PrepareTransfer", coordinator_request_id=value).coordinator_request_id == int(value)


@pytest.mark.parametrize("value", [MIN_INT64 - 1, MAX_INT64 + 1, 9.3e18, "9223372036854775808"])
def test_i64_field_rejects_values_beyond_64_bits_after_conversion(value: Any) -> None:
    assert field_rejected("PrepareTransfer", "coordinator_request_id", value)


@pytest.mark.parametrize("field", ["config_flags", "seqnum"])
def test_i32_fields_accept_32_bit_extremes_and_reject_beyond(field: str) -> None:
    assert getattr(decode("ConfigureAccount", **{field: -(2**31)}), field) == -(2**31)
    assert getattr(decode("ConfigureAccount", **{field: 2**31 - 1}), field) == 2**31 - 1
    assert field_rejected("ConfigureAccount", field, 2**31)
    assert field_rejected("ConfigureAccount", field, -(2**31) - 1)


def test_max_commit_delay_is_non_negative_i32() -> None:
    assert decode("PrepareTransfer", max_commit_delay=0).max_commit_delay == 0
    assert field_rejected("PrepareTransfer", "max_commit_delay", -1)
    assert field_rejected("PrepareTransfer", "max_commit_delay", 2**31)


@pytest.mark.parametrize(
    ("message_type", "field"),
    [
        ("PrepareTransfer", "min_locked_amount"),
        ("PrepareTransfer", "max_locked_amount"),
        ("FinalizeTransfer", "committed_amount"),
    ],
)
def test_amounts_are_non_negative_i64(message_type: str, field: str) -> None:
    lowest = {"min_locked_amount": 0, field: 0}
    highest = {"max_locked_amount": MAX_INT64, field: MAX_INT64}
    assert getattr(decode(message_type, **lowest), field) == 0
    assert getattr(decode(message_type, **highest), field) == MAX_INT64
    assert field_rejected(message_type, field, -1)


# --- floats (spec 01 §1.1) --------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(1.5, 1.5), ("1.5", 1.5), (" 2e3 ", 2000.0), (3, 3.0), ("1_0", 10.0)])
def test_float_field_accepts_numbers_and_numeric_strings(value: Any, expected: float) -> None:
    message = decode("ConfigureAccount", negligible_amount=value)
    assert message.negligible_amount == expected and isinstance(message.negligible_amount, float)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", '"nan"', '"inf"', '"-infinity"'])
def test_float_field_rejects_non_finite_values(literal: str) -> None:
    body = json.dumps(VALID["ChangeInterestRate"]).replace('"interest_rate": 2.5', f'"interest_rate": {literal}')
    with pytest.raises(InvalidMessage) as caught:
        messages.decode(JSON, "ChangeInterestRate", body.encode(), CHORE_KINDS)
    assert str(caught.value) == (
        "Message validation error: {'interest_rate': ['Special numeric values (nan or infinity) are not permitted.']}"
    )


@pytest.mark.parametrize("value", [True, False, "1.5x", "", [1.5], 10**400])
def test_float_field_rejects_booleans_non_numbers_and_overflowing_integers(value: Any) -> None:
    assert field_rejected("ChangeInterestRate", "interest_rate", value)


# Each float field is either refused when PostgreSQL cannot hold it, or
# normalised where it is stored (README, "What intake accepts"); a new one
# needs the same decision.
def test_every_float_field_is_checked_here() -> None:
    assert fields_of_type("float") == [
        ("ConfigureAccount", "negligible_amount"),
        ("ChangeInterestRate", "interest_rate"),
    ]


# Normalised by change_interest_rate: clamped to [-50, 100], zero when too small for `real`.
@pytest.mark.parametrize("value", [-1000.5, 1e300, 1e-46, 5e-324])
def test_chore_interest_rate_has_no_range_check(value: float) -> None:
    assert decode("ChangeInterestRate", interest_rate=value).interest_rate == value


def test_negligible_amount_must_not_be_negative() -> None:
    assert decode("ConfigureAccount", negligible_amount=-0.0).negligible_amount == 0.0
    assert field_rejected("ConfigureAccount", "negligible_amount", -1e-300)


# Fix of a poison message: the reference accepts these and then fails on every insert.
@pytest.mark.parametrize("value", [3.4028234663852886e38, 3.4028235e38, 1.401298464324817e-45, 1e30, 0.0])
def test_negligible_amount_that_fits_a_postgresql_real_is_accepted(value: float) -> None:
    assert decode("ConfigureAccount", negligible_amount=value).negligible_amount == value


@pytest.mark.parametrize("value", [3.5e38, 1.7976931348623157e308, 1e-46, 5e-324, "1e39"])
def test_negligible_amount_that_does_not_fit_a_postgresql_real_is_rejected(value: Any) -> None:
    assert rejection("ConfigureAccount", negligible_amount=value) == (
        "Message validation error: {'negligible_amount': ['Does not fit in a single-precision float.']}"
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
    | st.floats(min_value=3.4e38, max_value=3.41e38)
    | st.floats(min_value=0.0, max_value=3e-45)
)
def test_fits_float32_agrees_with_postgresql_real_conversion(conn, value: float) -> None:
    try:
        conn.execute("SELECT %s::float8::real", [value])
        postgresql_accepts = True
    except Exception:  # psycopg.errors.NumericValueOutOfRange
        postgresql_accepts = False
    assert messages.fits_float32(value) == postgresql_accepts


# --- strings (spec 01 §1.1–1.5, §5) -------------------------------------------------


@pytest.mark.parametrize("value", [5, 1.5, True, ["x"], {"x": 1}])
def test_string_field_rejects_non_strings(value: Any) -> None:
    assert rejection("ConfigureAccount", config_data=value) == (
        "Message validation error: {'config_data': ['Not a valid string.']}"
    )


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("x" * 2000, True),
        ("x" * 2001, False),
        ("ü" * 1000, True),  # 2000 bytes
        ("ü" * 1001, False),  # 1001 characters but 2002 bytes
        ("€" * 666 + "xx", True),  # 2000 bytes
        ("€" * 667, False),  # 2001 bytes
    ],
)
def test_config_data_is_limited_in_characters_and_utf8_bytes(value: str, accepted: bool) -> None:
    if accepted:
        assert decode("ConfigureAccount", config_data=value).config_data == value
    else:
        assert field_rejected("ConfigureAccount", "config_data", value)


@pytest.mark.parametrize("message_type", ["FinalizeTransfer", "PendingBalanceChange"])
@pytest.mark.parametrize(
    ("value", "accepted"), [("x" * 500, True), ("x" * 501, False), ("ü" * 250, True), ("ü" * 250 + "x", False)]
)
def test_transfer_note_is_limited_in_characters_and_utf8_bytes(message_type: str, value: str, accepted: bool) -> None:
    if accepted:
        assert decode(message_type, transfer_note=value).transfer_note == value
    else:
        assert field_rejected(message_type, "transfer_note", value)


@pytest.mark.parametrize("message_type", ["PrepareTransfer", "FinalizeTransfer", "PendingBalanceChange"])
@pytest.mark.parametrize(
    ("value", "accepted"), [("a", True), ("x" * 30, True), ("", False), ("x" * 31, False), ("dïrect", False)]
)
def test_coordinator_type_is_1_to_30_ascii_characters(message_type: str, value: str, accepted: bool) -> None:
    changes: dict[str, Any] = {"coordinator_type": value}
    if accepted:
        assert decode(message_type, **changes).coordinator_type == value
    else:
        assert field_rejected(message_type, "coordinator_type", value)


@pytest.mark.parametrize(("value", "accepted"), [("", True), ("1" * 100, True), ("1" * 101, False), ("１", False)])
def test_recipient_is_at_most_100_ascii_characters(value: str, accepted: bool) -> None:
    if accepted:
        assert decode("PrepareTransfer", recipient=value).recipient == value
    else:
        assert field_rejected("PrepareTransfer", "recipient", value)


@pytest.mark.parametrize(("value", "accepted"), [("ü" * 200, True), ("x" * 201, False), ("", True)])
def test_debtor_info_iri_is_at_most_200_characters(value: str, accepted: bool) -> None:
    if accepted:
        assert decode("UpdateDebtorInfo", debtor_info_iri=value).debtor_info_iri == value
    else:
        assert field_rejected("UpdateDebtorInfo", "debtor_info_iri", value)


@pytest.mark.parametrize(
    ("value", "accepted"), [("x" * 100, True), ("", True), ("x" * 101, False), ("téxt/html", False)]
)
def test_debtor_info_content_type_is_at_most_100_ascii_characters(value: str, accepted: bool) -> None:
    if accepted:
        assert decode("UpdateDebtorInfo", debtor_info_content_type=value).debtor_info_content_type == value
    else:
        assert field_rejected("UpdateDebtorInfo", "debtor_info_content_type", value)


# Fix of a poison message: PostgreSQL text cannot hold NUL, UTF-8 cannot hold a lone surrogate.
@pytest.mark.parametrize(
    ("message_type", "field"),
    [
        ("ConfigureAccount", "config_data"),
        ("FinalizeTransfer", "transfer_note"),
        ("PendingBalanceChange", "transfer_note"),
        ("PrepareTransfer", "coordinator_type"),
        ("UpdateDebtorInfo", "debtor_info_iri"),
        ("UpdateDebtorInfo", "debtor_info_content_type"),
    ],
)
def test_text_that_postgresql_cannot_store_is_rejected(message_type: str, field: str) -> None:
    assert field_rejected(message_type, field, "a\x00b")
    assert field_rejected(message_type, field, "a\ud800b")
    assert getattr(decode(message_type, **{field: "a\x01b"}), field) == "a\x01b"


def test_recipient_with_nul_is_accepted_and_unreachable() -> None:
    # Never stored as text: the handler answers RECIPIENT_IS_UNREACHABLE, as the reference does.
    message = decode("PrepareTransfer", recipient="7\x00")
    assert parse_recipient(message.recipient) is None


# --- regular expressions (spec 01 §0.2, quirk: Python `$`) -----------------------------


@pytest.mark.parametrize("message_type", ["FinalizeTransfer", "PendingBalanceChange"])
@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("", True),
        ("abc.-XYZ", True),
        ("12345678", True),
        ("abc\n", True),
        ("123456789", False),
        ("a b", False),
        ("abc\n\n", False),
        ("\nabc", False),
        ("ü", False),
    ],
)
def test_transfer_note_format_matches_the_pattern_with_python_dollar(
    message_type: str, value: str, accepted: bool
) -> None:
    if accepted:
        assert decode(message_type, transfer_note_format=value).transfer_note_format == value
    else:
        assert field_rejected(message_type, "transfer_note_format", value)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("", True),
        (SHA256_UPPER, True),
        (SHA256_UPPER.lower(), True),
        (SHA256_UPPER + "\n", True),
        ("\n", True),
        (SHA256_UPPER[:-1] + "f", False),
        (SHA256_UPPER[:-1], False),
        (SHA256_UPPER + "0", False),
    ],
)
def test_debtor_info_sha256_is_empty_or_64_hex_digits_in_one_case(value: str, accepted: bool) -> None:
    if accepted:
        assert decode("UpdateDebtorInfo", debtor_info_sha256=value).debtor_info_sha256 == value
    else:
        assert field_rejected("UpdateDebtorInfo", "debtor_info_sha256", value)


# --- date-times (spec 01 §1.1) ------------------------------------------------------


def _utc(*args: int, offset_minutes: int = 0) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.timezone(dt.timedelta(minutes=offset_minutes)))


DATE_TIME_FIELDS = [
    ("ConfigureAccount", "ts"),
    ("PrepareTransfer", "final_interest_rate_ts"),
    ("PrepareTransfer", "ts"),
    ("FinalizeTransfer", "ts"),
    ("PendingBalanceChange", "committed_at"),
    ("ChangeInterestRate", "ts"),
    ("UpdateDebtorInfo", "ts"),
]
DATE_TIME_RANGE_ERROR = "Must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z in UTC."


def test_every_date_time_field_is_checked_here() -> None:
    assert fields_of_type("dt.datetime") == DATE_TIME_FIELDS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-20T10:15:30.123456+00:00", _utc(2024, 5, 20, 10, 15, 30, 123456)),
        ("2024-05-20 10:15:30Z", _utc(2024, 5, 20, 10, 15, 30)),
        ("2024-5-2T1:2", _utc(2024, 5, 2, 1, 2)),
        ("2024-05-20T10:15:30.5+02", _utc(2024, 5, 20, 10, 15, 30, 500000, offset_minutes=120)),
        ("2024-05-20T10:15:30.123456789012-0530", _utc(2024, 5, 20, 10, 15, 30, 123456, offset_minutes=-330)),
        ("2024-05-20T10:15:30-05:30", _utc(2024, 5, 20, 10, 15, 30, offset_minutes=-330)),
        ("2024-05-20T10:15:30+00:00\n", _utc(2024, 5, 20, 10, 15, 30)),
        ("9999-12-31T23:59:59+00:00", _utc(9999, 12, 31, 23, 59, 59)),
    ],
)
def test_date_time_grammar_accepts(text: str, expected: dt.datetime) -> None:
    assert decode("ConfigureAccount", ts=text).ts == expected


# Fix of a poison message: an offset kept from the sender let a date-time past
# year 9999 in UTC be stored, and then no row holding it could be read back.
@pytest.mark.parametrize("text", ["2024-05-20T10:15:30.5+02", "2024-05-20T23:15:30-05:30", "9999-12-31T23:59:59+23:59"])
def test_date_time_is_converted_to_utc(text: str) -> None:
    assert decode("ConfigureAccount", ts=text).ts.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9999-12-31T23:59:59.999999Z", _utc(9999, 12, 31, 23, 59, 59, 999999)),
        ("9999-12-31T23:59:59.999999+00:01", _utc(9999, 12, 31, 23, 58, 59, 999999)),
        ("0001-01-01T00:00:00Z", _utc(1, 1, 1)),
        ("0001-01-01T00:00-23:59", _utc(1, 1, 1, 23, 59)),
    ],
)
def test_date_time_within_the_utc_range_is_accepted_at_its_extremes(text: str, expected: dt.datetime) -> None:
    for message_type, field in DATE_TIME_FIELDS:
        assert getattr(decode(message_type, **{field: text}), field) == expected


# Fix of a poison message: see test_date_time_is_converted_to_utc.
@pytest.mark.parametrize(
    "text",
    ["9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59.999999-00:01", "9999-12-31 23:00-01", "0001-01-01T00:00+00:01"],
)
@pytest.mark.parametrize(("message_type", "field"), DATE_TIME_FIELDS)
def test_date_time_outside_the_utc_range_is_rejected(message_type: str, field: str, text: str) -> None:
    reason = rejection(message_type, **{field: text})
    assert reason == f"Message validation error: {{{field!r}: [{DATE_TIME_RANGE_ERROR!r}]}}"


# Fix of a poison message: the reference yields a naive datetime that its handler cannot compare.
def test_date_time_without_zone_is_taken_as_utc() -> None:
    ts = decode("ConfigureAccount", ts="2024-05-20T10:15:30").ts
    assert ts == _utc(2024, 5, 20, 10, 15, 30) and ts.tzinfo is not None


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-20",
        "2024-05-20T10",
        "2024-05-20T10:15.5",
        "2024-05-20T10:15:30.1234567890123",
        "2024-05-20T10:15:30.",
        "2024-13-01T00:00",
        "2024-02-30T00:00",
        "2024-05-20T24:00",
        "2024-05-20T10:60",
        "2024-05-20T10:15:30+24:00",
        "2024-05-20T10:15:30+2",
        "2024-05-20T10:15:30 +00:00",
        " 2024-05-20T10:15:30",
        "2024-05-20T10:15:30Z\n\n",
        "2024-05-20t10:15:30",
        "24-05-20T10:15:30",
        "0000-01-01T00:00",
        "2024-05-20T10:15:30UTC",
    ],
)
def test_date_time_grammar_rejects(text: str) -> None:
    assert rejection("ConfigureAccount", ts=text) == "Message validation error: {'ts': ['Not a valid datetime.']}"


@pytest.mark.parametrize("value", [1716200130, 1716200130.5, True, ["2024-05-20T10:15:30"]])
def test_date_time_that_is_not_a_string_is_rejected(value: Any) -> None:
    assert field_rejected("PendingBalanceChange", "committed_at", value)


# --- PrepareTransfer cross-field rules (spec 01 §1.3) --------------------------------


def test_min_locked_amount_may_equal_but_not_exceed_max_locked_amount() -> None:
    assert decode("PrepareTransfer", min_locked_amount=5, max_locked_amount=5).max_locked_amount == 5
    assert rejection("PrepareTransfer", min_locked_amount=6, max_locked_amount=5) == (
        "Message validation error: {'max_locked_amount': ['Must be greater than or equal to min_locked_amount.']}"
    )


def test_direct_transfer_must_be_coordinated_by_the_sender() -> None:
    assert decode("PrepareTransfer", coordinator_id=1099511627778).coordinator_id == 1099511627778
    assert field_rejected("PrepareTransfer", "coordinator_id", 1099511627779)


def test_issuing_transfer_is_from_the_root_account_coordinated_by_the_debtor() -> None:
    issuing = {"coordinator_type": "issuing", "coordinator_id": -2, "creditor_id": 0}
    assert decode("PrepareTransfer", **issuing).coordinator_type == "issuing"
    assert rejection("PrepareTransfer", **{**issuing, "coordinator_id": -3}) == (
        "Message validation error: {'coordinator_id': ['Must equal debtor_id for issuing transfers.']}"
    )
    assert rejection("PrepareTransfer", **{**issuing, "creditor_id": 5}) == (
        "Message validation error: {'creditor_id': ['Must be 0 for issuing transfers.']}"
    )


def test_agent_rule_is_left_to_the_handler() -> None:
    message = decode("PrepareTransfer", coordinator_type="agent", coordinator_id=12345)
    assert message.coordinator_id == 12345


def test_other_coordinator_types_have_no_cross_field_rule() -> None:
    assert decode("PrepareTransfer", coordinator_type="interest", coordinator_id=-7).coordinator_id == -7


def test_finalize_transfer_has_no_coordinator_cross_check() -> None:
    assert decode("FinalizeTransfer", coordinator_id=99).coordinator_id == 99


# --- PendingBalanceChange (spec 01 §1.5) ---------------------------------------------


@pytest.mark.parametrize("value", [1, -1, MAX_INT64, -MAX_INT64])
def test_principal_delta_non_zero_within_63_bits_is_accepted(value: int) -> None:
    assert decode("PendingBalanceChange", principal_delta=value).principal_delta == value


def test_principal_delta_zero_is_rejected() -> None:
    assert rejection("PendingBalanceChange", principal_delta=0) == (
        "Message validation error: {'principal_delta': ['Must not be 0.']}"
    )


@pytest.mark.parametrize("value", [MIN_INT64, MAX_INT64 + 1])
def test_principal_delta_outside_symmetric_range_is_rejected(value: int) -> None:
    assert field_rejected("PendingBalanceChange", "principal_delta", value)


def test_pending_balance_change_has_no_ts() -> None:
    assert decode("PendingBalanceChange", ts=...).committed_at == TS_VALUE


# --- recipient parsing (spec 01 §1.3) -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7", 7),
        (" 007", 7),
        ("+7", 7),
        ("1_0", 10),
        ("\t42\n", 42),
        ("0", 0),
        ("1099511627781", 1099511627781),
        ("9223372036854775807", MAX_INT64),
        ("9223372036854775808", MIN_INT64),
        ("18446744073709551615", -1),
    ],
)
def test_recipient_parses_as_python_int_then_u64_to_i64(text: str, expected: int) -> None:
    assert parse_recipient(text) == expected


@pytest.mark.parametrize("text", ["", " ", "-1", "-0x1", "18446744073709551616", "abc", "1.0", "0x10", "1__0", "1e3"])
def test_recipient_that_is_not_a_u64_is_unreachable(text: str) -> None:
    assert parse_recipient(text) is None
