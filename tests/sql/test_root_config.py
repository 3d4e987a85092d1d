"""parse_root_config: RootConfigData as the reference parses it (spec 02 B9, spec 01 §6.4)."""

from __future__ import annotations

import psycopg
import pytest

MAX_INT64 = 9223372036854775807
SHA256_HEX = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
NULL_RESULT = (None, None, None, None, None)


def parse(conn: psycopg.Connection, config_data: str | None) -> tuple:
    """(is_valid, rate, limit, iri, sha256, content_type)."""
    row = conn.execute(
        "SELECT is_valid, interest_rate_target, issuing_limit, info_iri, info_sha256, info_content_type"
        " FROM parse_root_config(%s)",
        (config_data,),
    ).fetchone()
    assert row is not None
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)


# Spec 01 §6.4 examples, then the quirks of the reference's parser (B9).
VALID_DOCUMENTS = [
    "",
    "{}",
    '{"rate": 99.5}',
    '{"type": "RootConfigData", "rate": 0.0}',
    '{"info": {"iri": "http://example.com"}}',
    '{"rate": -50}',
    '{"rate": 100}',
    '{"limit": 0}',
    '{"info": {"iri": ""}}',
    '{"info": {"iri": "x", "type": "DebtorInfo", "contentType": "", "sha256": "' + SHA256_HEX + '"}}',
    '  {"rate": 1}\n',
]

INVALID_DOCUMENTS = [
    "NOT JSON",
    '{"rate": NaN}',
    '{"rate": Infinity}',
    '{"rate": -51}',
    '{"rate": 101}',
    '{"rate": 1e400}',
    '{"type": "INVALID_TYPE"}',
    '{"type": "RootConfigData-v2"}',
    '{"type": null}',
    '{"type": 1}',
    '{"info": {"iri": "' + "x" * 201 + '"}}',
    '{"info": {"iri": "x", "contentType": "' + "t" * 101 + '"}}',
    '{"info": {"iri": "x", "contentType": "text/plain; charset=\u00e9"}}',
    '{"limit": -1}',
    '{"limit": 9223372036854775808}',
    '{"limit": 9223372036854775807.0}',
    '{"limit": 9223372036854775807E0}',
    '{"foo": 1}',
    '{"limit": true}',
    '{"limit": null}',
    '{"limit": "4.5"}',
    '{"rate": true}',
    '{"rate": null}',
    '{"rate": "five"}',
    '{"info": {"iri": "x", "sha256": "' + SHA256_HEX.lower() + '"}}',
    '{"info": {"iri": "x", "sha256": "' + SHA256_HEX[:-1] + '"}}',
    '{"info": {"iri": "x", "sha256": "' + SHA256_HEX + '\\n"}}',
    '{"info": null}',
    '{"info": "http://example.com"}',
    '{"info": {}}',
    '{"info": {"iri": 5}}',
    '{"info": {"iri": "x", "contentType": null}}',
    '{"info": {"iri": "x", "type": "DebtorInfo-v1"}}',
    '{"info": {"iri": "x", "foo": 1}}',
    '{"info": {"iri": "\\u0000"}}',
    "[]",
    '"RootConfigData"',
    "null",
]


@pytest.mark.parametrize("config_data", VALID_DOCUMENTS)
def test_valid_root_config_is_accepted(conn, config_data):
    assert parse(conn, config_data)[0] is True


@pytest.mark.parametrize("config_data", INVALID_DOCUMENTS)
def test_invalid_root_config_is_rejected_with_null_results(conn, config_data):
    assert parse(conn, config_data) == (False, *NULL_RESULT)


def test_null_config_data_is_invalid(conn):
    assert parse(conn, None) == (False, *NULL_RESULT)


def test_empty_config_data_gives_defaults(conn):
    assert parse(conn, "") == (True, 0.0, MAX_INT64, None, None, None)


def test_empty_object_gives_defaults(conn):
    assert parse(conn, "{}") == (True, 0.0, MAX_INT64, None, None, None)


def test_rate_may_be_a_numeric_string(conn):
    assert parse(conn, '{"rate": "5"}')[1] == 5.0


def test_rate_string_may_have_spaces_and_digit_separators(conn):
    assert parse(conn, '{"rate": " 1_0.5 "}')[1] == 10.5


def test_rate_is_rounded_to_double_before_the_range_check(conn):
    # float("100.0000000000000001") == 100.0 in the reference.
    assert parse(conn, '{"rate": 100.0000000000000001}')[:2] == (True, 100.0)


def test_rate_keeps_every_digit_a_double_holds(conn):
    assert parse(conn, '{"rate": 1.23456789012345}')[1] == 1.23456789012345


def test_rate_too_small_for_a_double_is_zero(conn):
    # float("1e-400") == 0.0 in the reference; PostgreSQL would raise on underflow.
    assert parse(conn, '{"rate": 1e-400}')[:2] == (True, 0.0)


# A fix: a rate that the accounts would store as zero (too small for `real`, see
# change_interest_rate) is zero, so no one casts it to `real` and fails on underflow.
@pytest.mark.parametrize("config_data", ['{"rate": 1e-46}', '{"rate": -1e-46}', '{"rate": "1e-41"}'])
def test_rate_too_small_for_single_precision_is_zero(conn, config_data):
    assert parse(conn, config_data)[:2] == (True, 0.0)


def test_rate_that_single_precision_holds_is_kept(conn):
    assert parse(conn, '{"rate": 1e-39}')[:2] == (True, 1e-39)


def test_fractional_limit_is_truncated(conn):
    assert parse(conn, '{"limit": 100.9}')[2] == 100


def test_negative_fractional_limit_above_minus_one_truncates_to_zero(conn):
    assert parse(conn, '{"limit": -0.5}')[:3] == (True, 0.0, 0)


def test_float_limit_is_rounded_to_double_before_truncation(conn):
    # 2^63 - 1025 as a float literal is the double 2^63 - 1024.
    assert parse(conn, '{"limit": 9223372036854774783.0}')[2] == 9223372036854774784


def test_limit_too_small_for_a_double_is_zero(conn):
    assert parse(conn, '{"limit": 1e-400}')[:3] == (True, 0.0, 0)


def test_limit_may_be_a_numeric_string(conn):
    assert parse(conn, '{"limit": "100"}')[2] == 100


def test_integer_limit_is_exact_up_to_max_int64(conn):
    assert parse(conn, '{"limit": 9223372036854775807}')[2] == MAX_INT64


def test_full_info_is_returned_with_decoded_sha256(conn):
    document = (
        '{"type": "RootConfigData", "rate": 2.5, "limit": 1000,'
        ' "info": {"type": "DebtorInfo", "iri": "https://example.com/d/1",'
        ' "contentType": "text/html", "sha256": "' + SHA256_HEX + '"}}'
    )
    assert parse(conn, document) == (
        True,
        2.5,
        1000,
        "https://example.com/d/1",
        bytes.fromhex(SHA256_HEX),
        "text/html",
    )


def test_info_without_optional_fields_gives_nulls(conn):
    assert parse(conn, '{"info": {"iri": "http://example.com"}}')[3:] == ("http://example.com", None, None)


def test_empty_iri_and_content_type_are_kept_as_empty_strings(conn):
    assert parse(conn, '{"info": {"iri": "", "contentType": ""}}')[3:] == ("", None, "")


def test_iri_of_200_characters_is_accepted(conn):
    iri = "\u00e9" * 200  # characters, not bytes
    assert parse(conn, '{"info": {"iri": "' + iri + '"}}')[3] == iri


def test_content_type_of_100_ascii_characters_is_accepted(conn):
    content_type = "t" * 100
    assert parse(conn, '{"info": {"iri": "x", "contentType": "' + content_type + '"}}')[5] == content_type


def test_duplicate_keys_take_the_last_value(conn):
    assert parse(conn, '{"rate": 200, "rate": 1}')[:2] == (True, 1.0)


def test_duplicate_key_with_invalid_last_value_is_invalid(conn):
    assert parse(conn, '{"rate": 1, "rate": 200}')[0] is False


def test_string_escapes_are_decoded_before_checks(conn):
    result = parse(conn, '{"type": "\\u0052ootConfigData", "info": {"iri": "a\\/b"}}')
    assert (result[0], result[3]) == (True, "a/b")
