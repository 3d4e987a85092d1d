"""Outgoing messages: JSON bodies, AMQP properties and destinations (spec 01 §2, §3.1–3.4, §5)."""

from __future__ import annotations

import datetime as dt
import math
import struct

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyswpt import wire

UTC = dt.UTC
DEBTOR = -2
CREDITOR = 1099511627778
OTHER_CREDITOR = 1099511627781
CREATED = dt.date(2024, 5, 19)
T = dt.datetime(2024, 5, 20, 10, 15, 30, 123456, tzinfo=UTC)
T_PLUS_1S = dt.datetime(2024, 5, 20, 10, 15, 31, 123456, tzinfo=UTC)
T_PLUS_5MIN = dt.datetime(2024, 5, 20, 10, 20, 30, 123456, tzinfo=UTC)
T0 = dt.datetime(1970, 1, 1, tzinfo=UTC)
T_INFINITY = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
TRANSFER_ID = (19862 << 40) + 3


# --- spec 01 §2.2: each example, byte for byte, from field values ------------------


def test_rejected_config_example() -> None:
    fields = {
        "type": "RejectedConfig",
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "config_ts": T,
        "config_seqnum": 7,
        "negligible_amount": 0.0,
        "config_data": "xyz",
        "config_flags": 1,
        "ts": T_PLUS_1S,
        "rejection_code": "INVALID_CONFIGURATION",
    }
    assert wire.smp_body(fields) == (
        b'{"type":"RejectedConfig","debtor_id":-2,"creditor_id":1099511627778,'
        b'"config_ts":"2024-05-20T10:15:30.123456+00:00","config_seqnum":7,"negligible_amount":0.0,'
        b'"config_data":"xyz","config_flags":1,"ts":"2024-05-20T10:15:31.123456+00:00",'
        b'"rejection_code":"INVALID_CONFIGURATION"}'
    )


def test_rejected_transfer_example() -> None:
    fields = {
        "type": "RejectedTransfer",
        "coordinator_type": "direct",
        "coordinator_id": CREDITOR,
        "coordinator_request_id": 42,
        "status_code": "RECIPIENT_IS_UNREACHABLE",
        "total_locked_amount": 0,
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "ts": T,
    }
    assert wire.smp_body(fields) == (
        b'{"type":"RejectedTransfer","coordinator_type":"direct","coordinator_id":1099511627778,'
        b'"coordinator_request_id":42,"status_code":"RECIPIENT_IS_UNREACHABLE","total_locked_amount":0,'
        b'"debtor_id":-2,"creditor_id":1099511627778,"ts":"2024-05-20T10:15:30.123456+00:00"}'
    )


def test_prepared_transfer_example() -> None:
    fields = {
        "type": "PreparedTransfer",
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "transfer_id": TRANSFER_ID,
        "coordinator_type": "direct",
        "coordinator_id": CREDITOR,
        "coordinator_request_id": 43,
        "locked_amount": 1000,
        "recipient": "1099511627781",
        "prepared_at": T,
        "ts": T,
        "demurrage_rate": -50.0,
        "deadline": dt.datetime(2024, 8, 18, 10, 15, 30, 123456, tzinfo=UTC),
        "final_interest_rate_ts": T_INFINITY,
    }
    assert wire.smp_body(fields) == (
        b'{"type":"PreparedTransfer","debtor_id":-2,"creditor_id":1099511627778,'
        b'"transfer_id":21838499950886915,"coordinator_type":"direct","coordinator_id":1099511627778,'
        b'"coordinator_request_id":43,"locked_amount":1000,"recipient":"1099511627781",'
        b'"prepared_at":"2024-05-20T10:15:30.123456+00:00","ts":"2024-05-20T10:15:30.123456+00:00",'
        b'"demurrage_rate":-50.0,"deadline":"2024-08-18T10:15:30.123456+00:00",'
        b'"final_interest_rate_ts":"9999-12-31T23:59:59+00:00"}'
    )


def test_finalized_transfer_example() -> None:
    fields = {
        "type": "FinalizedTransfer",
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "transfer_id": TRANSFER_ID,
        "coordinator_type": "direct",
        "coordinator_id": CREDITOR,
        "coordinator_request_id": 43,
        "prepared_at": T,
        "ts": T_PLUS_5MIN,
        "committed_amount": 900,
        "total_locked_amount": 0,
        "status_code": "OK",
    }
    assert wire.smp_body(fields) == (
        b'{"type":"FinalizedTransfer","debtor_id":-2,"creditor_id":1099511627778,'
        b'"transfer_id":21838499950886915,"coordinator_type":"direct","coordinator_id":1099511627778,'
        b'"coordinator_request_id":43,"prepared_at":"2024-05-20T10:15:30.123456+00:00",'
        b'"ts":"2024-05-20T10:20:30.123456+00:00","committed_amount":900,"total_locked_amount":0,'
        b'"status_code":"OK"}'
    )


def _account_update(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "type": "AccountUpdate",
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "last_change_ts": T,
        "last_change_seqnum": 5,
        "principal": 1000,
        "interest": 12.5,
        "interest_rate": 2.5,
        "transfer_note_max_bytes": 500,
        "demurrage_rate": -50.0,
        "last_interest_rate_change_ts": dt.datetime(2024, 5, 19, 10, 15, 31, 500000, tzinfo=UTC),
        "last_transfer_number": 2,
        "last_transfer_committed_at": T,
        "last_config_ts": dt.datetime(2024, 5, 19, 10, 15, 30, 123456, tzinfo=UTC),
        "last_config_seqnum": 1,
        "creation_date": CREATED,
        "negligible_amount": 0.0,
        "config_data": "",
        "config_flags": 0,
        "ts": T,
        "ttl": 604800,
        "commit_period": 7776000,
        "account_id": "1099511627778",
        "debtor_info_iri": "https://example.com/debtors/ü",
        "debtor_info_content_type": "text/html",
        "debtor_info_sha256": bytes(range(32)),
    }
    fields.update(overrides)
    return fields


def test_account_update_example_with_non_ascii_iri_written_raw() -> None:
    assert (
        wire.smp_body(_account_update())
        == (
            '{"type":"AccountUpdate","debtor_id":-2,"creditor_id":1099511627778,'
            '"last_change_ts":"2024-05-20T10:15:30.123456+00:00","last_change_seqnum":5,"principal":1000,'
            '"interest":12.5,"interest_rate":2.5,"transfer_note_max_bytes":500,"demurrage_rate":-50.0,'
            '"last_interest_rate_change_ts":"2024-05-19T10:15:31.500000+00:00","last_transfer_number":2,'
            '"last_transfer_committed_at":"2024-05-20T10:15:30.123456+00:00",'
            '"last_config_ts":"2024-05-19T10:15:30.123456+00:00","last_config_seqnum":1,'
            '"creation_date":"2024-05-19","negligible_amount":0.0,"config_data":"","config_flags":0,'
            '"ts":"2024-05-20T10:15:30.123456+00:00","ttl":604800,"commit_period":7776000,'
            '"account_id":"1099511627778","debtor_info_iri":"https://example.com/debtors/ü",'
            '"debtor_info_content_type":"text/html",'
            '"debtor_info_sha256":"000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F"}'
        ).encode()
    )


def test_root_account_update_example_with_escaped_config_data_and_no_debtor_info() -> None:
    fields = _account_update(
        creditor_id=0,
        last_change_seqnum=-2147483648,
        principal=-1000,
        interest=0.0,
        interest_rate=0.0,
        last_interest_rate_change_ts=T0,
        last_transfer_number=0,
        last_transfer_committed_at=T0,
        last_config_ts=T,
        last_config_seqnum=3,
        negligible_amount=1e30,
        config_data='{"type":"RootConfigData","rate":2.5}',
        account_id="0",
        debtor_info_iri=None,
        debtor_info_content_type=None,
        debtor_info_sha256=None,
    )
    assert wire.smp_body(fields) == (
        b'{"type":"AccountUpdate","debtor_id":-2,"creditor_id":0,'
        b'"last_change_ts":"2024-05-20T10:15:30.123456+00:00","last_change_seqnum":-2147483648,'
        b'"principal":-1000,"interest":0.0,"interest_rate":0.0,"transfer_note_max_bytes":500,'
        b'"demurrage_rate":-50.0,"last_interest_rate_change_ts":"1970-01-01T00:00:00+00:00",'
        b'"last_transfer_number":0,"last_transfer_committed_at":"1970-01-01T00:00:00+00:00",'
        b'"last_config_ts":"2024-05-20T10:15:30.123456+00:00","last_config_seqnum":3,'
        b'"creation_date":"2024-05-19","negligible_amount":1e+30,'
        b'"config_data":"{\\"type\\":\\"RootConfigData\\",\\"rate\\":2.5}","config_flags":0,'
        b'"ts":"2024-05-20T10:15:30.123456+00:00","ttl":604800,"commit_period":7776000,'
        b'"account_id":"0","debtor_info_iri":"","debtor_info_content_type":"","debtor_info_sha256":""}'
    )


def test_account_purge_example() -> None:
    fields = {
        "type": "AccountPurge",
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "creation_date": CREATED,
        "ts": T,
    }
    assert wire.smp_body(fields) == (
        b'{"type":"AccountPurge","debtor_id":-2,"creditor_id":1099511627778,'
        b'"creation_date":"2024-05-19","ts":"2024-05-20T10:15:30.123456+00:00"}'
    )


def test_account_transfer_example_with_non_ascii_note() -> None:
    fields = {
        "type": "AccountTransfer",
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "creation_date": CREATED,
        "transfer_number": 3,
        "coordinator_type": "direct",
        "committed_at": T_PLUS_5MIN,
        "acquired_amount": -900,
        "transfer_note_format": "",
        "transfer_note": "Hello, Мир",
        "principal": 100,
        "previous_transfer_number": 2,
        "sender": "1099511627778",
        "recipient": "1099511627781",
        "ts": T_PLUS_5MIN,
    }
    assert (
        wire.smp_body(fields)
        == (
            '{"type":"AccountTransfer","debtor_id":-2,"creditor_id":1099511627778,'
            '"creation_date":"2024-05-19","transfer_number":3,"coordinator_type":"direct",'
            '"committed_at":"2024-05-20T10:20:30.123456+00:00","acquired_amount":-900,'
            '"transfer_note_format":"","transfer_note":"Hello, Мир","principal":100,'
            '"previous_transfer_number":2,"sender":"1099511627778","recipient":"1099511627781",'
            '"ts":"2024-05-20T10:20:30.123456+00:00"}'
        ).encode()
    )


def test_account_transfer_example_of_interest_payment() -> None:
    fields = {
        "type": "AccountTransfer",
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "creation_date": CREATED,
        "transfer_number": 4,
        "coordinator_type": "interest",
        "committed_at": T,
        "acquired_amount": 15,
        "transfer_note_format": "",
        "transfer_note": "",
        "principal": 115,
        "previous_transfer_number": 3,
        "sender": "0",
        "recipient": "1099511627778",
        "ts": T,
    }
    assert wire.smp_body(fields) == (
        b'{"type":"AccountTransfer","debtor_id":-2,"creditor_id":1099511627778,'
        b'"creation_date":"2024-05-19","transfer_number":4,"coordinator_type":"interest",'
        b'"committed_at":"2024-05-20T10:15:30.123456+00:00","acquired_amount":15,'
        b'"transfer_note_format":"","transfer_note":"","principal":115,"previous_transfer_number":3,'
        b'"sender":"0","recipient":"1099511627778","ts":"2024-05-20T10:15:30.123456+00:00"}'
    )


def _pending_balance_change() -> dict[str, object]:
    return {
        "type": "PendingBalanceChange",
        "debtor_id": DEBTOR,
        "creditor_id": OTHER_CREDITOR,
        "change_id": 77,
        "coordinator_type": "direct",
        "transfer_note_format": "",
        "transfer_note": "Hello, Мир",
        "committed_at": T_PLUS_5MIN,
        "principal_delta": 900,
        "other_creditor_id": CREDITOR,
    }


def test_pending_balance_change_example() -> None:
    assert (
        wire.smp_body(_pending_balance_change())
        == (
            '{"type":"PendingBalanceChange","debtor_id":-2,"creditor_id":1099511627781,"change_id":77,'
            '"coordinator_type":"direct","transfer_note_format":"","transfer_note":"Hello, Мир",'
            '"committed_at":"2024-05-20T10:20:30.123456+00:00","principal_delta":900,'
            '"other_creditor_id":1099511627778}'
        ).encode()
    )


# --- spec 01 §2.1: numbers ----------------------------------------------------------


def test_floats_always_have_a_point_or_an_exponent_and_ints_are_exact() -> None:
    fields = {
        "a": 0.0,
        "b": 1e30,
        "c": -50.0,
        "d": 2.5,
        "e": 1.5e-07,
        "f": 2.0,
        "min": -(2**63),
        "max": 2**63 - 1,
        "zero": 0,
    }
    assert wire.smp_body(fields) == (
        b'{"a":0.0,"b":1e+30,"c":-50.0,"d":2.5,"e":1.5e-07,"f":2.0,'
        b'"min":-9223372036854775808,"max":9223372036854775807,"zero":0}'
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_is_refused(value: float) -> None:
    with pytest.raises(ValueError):
        wire.smp_body({"interest": value})
    with pytest.raises(ValueError):
        wire.chore_body({"interest_rate": value})


def test_boolean_is_refused() -> None:
    with pytest.raises(TypeError):
        wire.smp_body({"principal": True})


def test_null_is_refused_outside_the_debtor_info_fields() -> None:
    with pytest.raises(ValueError):
        wire.smp_body({"config_data": None})


@pytest.mark.parametrize(
    ("stored", "sent"),
    [(123456789.0, b"123456790.0"), (2.123456789, b"2.1234567"), (0.1, b"0.1"), (1e30, b"1e+30"), (2.5, b"2.5")],
)
def test_float32_fields_are_sent_as_postgresql_prints_a_real(stored: float, sent: bytes) -> None:
    body = wire.smp_body({"negligible_amount": stored, "interest_rate": stored, "interest": 123456789.0})
    assert body == b'{"negligible_amount":' + sent + b',"interest_rate":' + sent + b',"interest":123456789.0}'


def _fits_float32(value: float) -> bool:
    # Outgoing values come from `real` columns; tiny values would not get there.
    return value == 0.0 or abs(value) >= 2.0**-149


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(width=32, allow_nan=False, allow_infinity=False) | st.floats(-1e38, 1e38).filter(_fits_float32))
def test_float32_rounding_matches_postgresql_real_output(conn, value: float) -> None:
    printed = conn.execute("SELECT %s::float8::real::text", [value]).fetchone()[0]
    assert wire.float32_rounded(value) == float(printed)


@pytest.mark.parametrize("value", [3.4028235e38, 36085713.770244345, 95978336.0, 1.5474250491067253e26, 2.0**-149])
def test_float32_rounding_matches_postgresql_at_interval_bounds(conn, value: float) -> None:
    printed = conn.execute("SELECT %s::float8::real::text", [value]).fetchone()[0]
    assert wire.float32_rounded(value) == float(printed)


# --- spec 01 §2.1: dates, date-times, bytes ---------------------------------------


def test_datetime_without_microseconds_has_no_fraction() -> None:
    assert wire.smp_body({"ts": dt.datetime(1970, 1, 1, tzinfo=UTC)}) == b'{"ts":"1970-01-01T00:00:00+00:00"}'


def test_datetime_with_microseconds_has_six_digits() -> None:
    value = dt.datetime(2024, 5, 19, 10, 15, 31, 500000, tzinfo=UTC)
    assert wire.smp_body({"ts": value}) == b'{"ts":"2024-05-19T10:15:31.500000+00:00"}'


def test_datetime_in_another_zone_is_written_in_utc() -> None:
    value = dt.datetime(2024, 5, 20, 13, 15, 30, 123456, tzinfo=dt.timezone(dt.timedelta(hours=3)))
    assert wire.smp_body({"ts": value}) == b'{"ts":"2024-05-20T10:15:30.123456+00:00"}'


def test_datetime_crossing_midnight_into_utc() -> None:
    value = dt.datetime(2024, 5, 19, 22, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert wire.format_datetime(value) == "2024-05-20T03:00:00+00:00"


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError):
        wire.smp_body({"ts": dt.datetime(2024, 5, 20)})


def test_date_is_written_as_year_month_day() -> None:
    assert wire.smp_body({"creation_date": dt.date(24, 1, 2)}) == b'{"creation_date":"0024-01-02"}'


def test_sha256_bytes_are_uppercase_hex_and_none_is_empty() -> None:
    assert wire.smp_body({"debtor_info_sha256": b"\xab\xcd"}) == b'{"debtor_info_sha256":"ABCD"}'
    assert wire.smp_body({"debtor_info_sha256": None}) == b'{"debtor_info_sha256":""}'


def test_control_characters_and_quotes_are_escaped() -> None:
    assert wire.smp_body({"transfer_note": 'a"\\\n\x00'}) == b'{"transfer_note":"a\\"\\\\\\n\\u0000"}'


# --- spec 01 §2.1, §5: chore bodies -------------------------------------------------


def test_chore_body_uses_default_json_formatting() -> None:
    fields = {"type": "ChangeInterestRate", "debtor_id": DEBTOR, "creditor_id": CREDITOR, "interest_rate": 2.5, "ts": T}
    assert wire.chore_body(fields) == (
        b'{"type": "ChangeInterestRate", "debtor_id": -2, "creditor_id": 1099511627778, '
        b'"interest_rate": 2.5, "ts": "2024-05-20T10:15:30.123456+00:00"}'
    )


def test_chore_body_escapes_non_ascii_and_keeps_double_precision() -> None:
    fields = {"debtor_info_iri": "https://example.com/ü", "debtor_info_sha256": None, "interest_rate": 2.123456789}
    assert wire.chore_body(fields) == (
        b'{"debtor_info_iri": "https://example.com/\\u00fc", "debtor_info_sha256": "", "interest_rate": 2.123456789}'
    )


# --- spec 01 §3.1, §5: properties -------------------------------------------------


def test_smp_properties_of_a_transfer_reply_carry_coordinator_headers() -> None:
    fields = {
        "type": "PreparedTransfer",
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "coordinator_type": "direct",
        "coordinator_id": CREDITOR,
    }
    properties = wire.smp_properties("PreparedTransfer", fields)
    assert properties.content_type == "application/json"
    assert properties.type == "PreparedTransfer"
    assert properties.delivery_mode == 2
    assert properties.app_id == "swpt_accounts"
    assert properties.headers == {
        "message-type": "PreparedTransfer",
        "debtor-id": DEBTOR,
        "creditor-id": CREDITOR,
        "coordinator-id": CREDITOR,
        "coordinator-type": "direct",
    }


def test_smp_properties_set_nothing_else() -> None:
    properties = wire.smp_properties("AccountPurge", {"debtor_id": DEBTOR, "creditor_id": CREDITOR})
    unset = (
        "message_id",
        "timestamp",
        "priority",
        "expiration",
        "correlation_id",
        "content_encoding",
        "reply_to",
        "user_id",
        "cluster_id",
    )
    assert all(getattr(properties, name) is None for name in unset)


def test_pending_balance_change_gets_no_coordinator_headers_despite_its_coordinator_type() -> None:
    properties = wire.smp_properties("PendingBalanceChange", _pending_balance_change())
    assert properties.headers == {
        "message-type": "PendingBalanceChange",
        "debtor-id": DEBTOR,
        "creditor-id": OTHER_CREDITOR,
    }


def test_smp_properties_refuse_a_body_of_another_type() -> None:
    with pytest.raises(ValueError):
        wire.smp_properties("AccountUpdate", {"type": "AccountPurge", "debtor_id": 1, "creditor_id": 2})


def test_integer_headers_encode_as_amqp_integers() -> None:
    # Informative in the spec: small values as signed 32-bit 'I', large as 8-byte.
    properties = wire.smp_properties("AccountPurge", {"debtor_id": DEBTOR, "creditor_id": CREDITOR})
    encoded = b"".join(properties.encode())
    assert b"\x09debtor-idI\xff\xff\xff\xfe" in encoded
    assert b"\x0bcreditor-idl" + struct.pack(">q", CREDITOR) in encoded
    decoded = pika.BasicProperties()
    decoded.decode(encoded)
    assert decoded.headers["debtor-id"] == DEBTOR and decoded.headers["creditor-id"] == CREDITOR


def test_chore_properties_have_no_headers() -> None:
    properties = wire.chore_properties("CapitalizeInterest")
    assert (properties.content_type, properties.type, properties.delivery_mode, properties.app_id) == (
        "application/json",
        "CapitalizeInterest",
        2,
        "swpt_accounts",
    )
    assert properties.headers is None


# --- spec 01 §3.2, §3.4: destinations -----------------------------------------------


@pytest.mark.parametrize("message_type", ["RejectedConfig", "AccountUpdate", "AccountPurge", "AccountTransfer"])
def test_creditor_messages_go_to_creditors_by_creditor_id(message_type: str) -> None:
    assert wire.destination(message_type, {"debtor_id": DEBTOR, "creditor_id": CREDITOR, "config_flags": 1}) == (
        "to_creditors",
        "00.00.01.00.00.00.00.02",
        True,
    )


@pytest.mark.parametrize("message_type", ["RejectedConfig", "AccountUpdate", "AccountPurge"])
def test_root_account_messages_go_to_debtors_by_debtor_id(message_type: str) -> None:
    assert wire.destination(message_type, {"debtor_id": DEBTOR, "creditor_id": 0, "config_flags": 0}) == (
        "to_debtors",
        "ff.ff.ff.ff.ff.ff.ff.fe",
        True,
    )


def test_root_account_update_scheduled_for_deletion_is_not_mandatory() -> None:
    assert wire.destination("AccountUpdate", {"debtor_id": DEBTOR, "creditor_id": 0, "config_flags": 3}) == (
        "to_debtors",
        "ff.ff.ff.ff.ff.ff.ff.fe",
        False,
    )


def test_rejected_config_of_root_scheduled_for_deletion_stays_mandatory() -> None:
    assert wire.destination("RejectedConfig", {"debtor_id": DEBTOR, "creditor_id": 0, "config_flags": 1}).mandatory


@pytest.mark.parametrize("message_type", ["RejectedTransfer", "PreparedTransfer", "FinalizedTransfer"])
def test_transfer_replies_go_to_coordinators_by_coordinator_id(message_type: str) -> None:
    fields = {"debtor_id": DEBTOR, "creditor_id": 0, "coordinator_type": "issuing", "coordinator_id": DEBTOR}
    assert wire.destination(message_type, fields) == ("to_coordinators", "ff.ff.ff.ff.ff.ff.ff.fe", True)


def test_pending_balance_change_goes_to_accounts_in_by_pair_hash() -> None:
    assert wire.destination("PendingBalanceChange", _pending_balance_change()) == (
        "accounts_in",
        "1.1.0.0.0.0.1.0.1.1.1.1.0.1.0.0.1.0.0.1.1.1.0.1",
        True,
    )


def test_unknown_outgoing_type_has_no_destination() -> None:
    with pytest.raises(ValueError):
        wire.destination("ConfigureAccount", {"debtor_id": 1, "creditor_id": 2})


def test_chores_go_to_their_queue_through_the_default_exchange() -> None:
    assert wire.chore_destination("swpt_accounts_chores") == ("", "swpt_accounts_chores", True)
