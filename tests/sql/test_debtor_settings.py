"""Interest rate, debtor info and initialisation (spec 02 §2.3, §2.7, §2.8; §6 edge cases 8-11)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from factories import DEFAULT_NOW, STATUS_DELETED, T0, insert_account
from psycopg.rows import dict_row

DEBTOR_ID = -2
CREDITOR_ID = 1099511627778
NOW = DEFAULT_NOW
DAY = dt.timedelta(days=1)
MICROSECOND = dt.timedelta(microseconds=1)
MAX_DELAY_SECONDS = 7 * 86400.0
# Minimum time between two rate changes: the message max delay plus one day.
RATE_CHANGE_INTERVAL = dt.timedelta(seconds=MAX_DELAY_SECONDS) + DAY
SECONDS_IN_YEAR = 31557600
IRI = "https://example.com/debtors/2"
CONTENT_TYPE = "text/html"
SHA256 = bytes(range(32))


def change_rate(
    conn: psycopg.Connection,
    rate: float,
    *,
    creditor_id: int = CREDITOR_ID,
    ts: dt.datetime | None = None,
    now: dt.datetime = NOW,
) -> None:
    conn.execute(
        "SELECT change_interest_rate(%s, %s, %s, %s, %s, %s)",
        (DEBTOR_ID, creditor_id, rate, now if ts is None else ts, MAX_DELAY_SECONDS, now),
    )


def update_info(
    conn: psycopg.Connection,
    iri: str | None = IRI,
    content_type: str | None = CONTENT_TYPE,
    sha256: bytes | None = SHA256,
    *,
    creditor_id: int = CREDITOR_ID,
    ts: dt.datetime | None = None,
    now: dt.datetime = NOW,
) -> None:
    conn.execute(
        "SELECT update_debtor_info(%s, %s, %s, %s, %s, %s, %s)",
        (DEBTOR_ID, creditor_id, iri, content_type, sha256, now if ts is None else ts, now),
    )


def initialize(conn: psycopg.Connection, root_config_data: str | None, *, now: dt.datetime = NOW) -> None:
    conn.execute(
        "SELECT initialize_account(%s, %s, %s, %s, %s)",
        (DEBTOR_ID, CREDITOR_ID, root_config_data, MAX_DELAY_SECONDS, now),
    )


def account(conn: psycopg.Connection, creditor_id: int = CREDITOR_ID) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT * FROM account WHERE debtor_id = %s AND creditor_id = %s", (DEBTOR_ID, creditor_id)
        ).fetchone()


def account_updates(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute("SELECT * FROM account_update_signal ORDER BY signal_id").fetchall()


def stored_rate(conn: psycopg.Connection) -> float:
    """The REAL column widened exactly, so that 3.567 reads 3.566999912..."""
    return conn.execute(
        "SELECT interest_rate::float8 FROM account WHERE debtor_id = %s AND creditor_id = %s",
        (DEBTOR_ID, CREDITOR_ID),
    ).fetchone()[0]


def single_precision(conn: psycopg.Connection, value: float) -> float:
    return conn.execute("SELECT %s::float8::real::float8", (value,)).fetchone()[0]


def arrange_account(conn: psycopg.Connection, creditor_id: int = CREDITOR_ID, **overrides: Any) -> dict[str, Any]:
    return insert_account(conn, DEBTOR_ID, creditor_id, now=NOW - 30 * DAY, **overrides)


# Interest rate (spec 02 §2.7, edge cases 9 and 10) -----------------------------------------------


def test_rate_change_on_missing_account_does_nothing(conn):
    change_rate(conn, 7.0)
    assert (account(conn), account_updates(conn)) == (None, [])


def test_rate_change_on_deleted_account_does_nothing(conn):
    arrange_account(conn, status_flags=STATUS_DELETED)
    change_rate(conn, 7.0)
    assert (account(conn)["interest_rate"], account_updates(conn)) == (0.0, [])


def test_rate_change_on_root_account_does_nothing(conn):
    arrange_account(conn, creditor_id=0)
    change_rate(conn, 7.0, creditor_id=0)
    assert (account(conn, 0)["interest_rate"], account_updates(conn)) == (0.0, [])


def test_first_rate_change_applies(conn):
    arrange_account(conn, last_change_seqnum=4, interest_rate=2.0)
    change_rate(conn, 7.0)
    row = account(conn)
    assert (row["interest_rate"], row["previous_interest_rate"]) == (7.0, 2.0)
    assert row["last_interest_rate_change_ts"] == NOW
    assert (row["last_change_seqnum"], row["last_change_ts"]) == (5, NOW)


def test_rate_change_emits_an_account_update_at_now(conn):
    arrange_account(conn, last_change_seqnum=4)
    change_rate(conn, 7.0)
    updates = account_updates(conn)
    summary = [(u["interest_rate"], u["last_change_seqnum"], u["inserted_at"]) for u in updates]
    assert summary == [(7.0, 5, NOW)]
    assert updates[0]["last_interest_rate_change_ts"] == NOW


def test_immediate_second_rate_change_is_refused_by_the_minimum_interval(conn):
    arrange_account(conn)
    change_rate(conn, 7.0)
    change_rate(conn, 1.0, now=NOW + MICROSECOND)
    assert account(conn)["interest_rate"] == 7.0
    assert len(account_updates(conn)) == 1


def test_rate_change_just_before_the_interval_has_passed_is_refused(conn):
    changed_at = NOW - RATE_CHANGE_INTERVAL + MICROSECOND
    arrange_account(conn, interest_rate=7.0, last_interest_rate_change_ts=changed_at)
    change_rate(conn, 1.0)
    assert account(conn)["interest_rate"] == 7.0


def test_rate_change_once_the_interval_has_passed_applies(conn):
    arrange_account(conn, interest_rate=7.0, last_interest_rate_change_ts=NOW - RATE_CHANGE_INTERVAL)
    change_rate(conn, 1.0)
    assert account(conn)["interest_rate"] == 1.0


@pytest.mark.parametrize(("requested", "stored"), [(1e9, 100.0), (-99.9999999999, -50.0), (float("inf"), 100.0)])
def test_rate_is_clamped_to_the_allowed_range(conn, requested, stored):
    arrange_account(conn)
    change_rate(conn, requested)
    assert account(conn)["interest_rate"] == stored


def test_rate_too_small_for_single_precision_is_zero_instead_of_an_error(conn):
    arrange_account(conn, interest_rate=5.0)
    change_rate(conn, 1e-50)
    assert account(conn)["interest_rate"] == 0.0


def test_nan_rate_does_nothing(conn):
    arrange_account(conn)
    change_rate(conn, float("nan"))
    assert (account(conn)["last_interest_rate_change_ts"], account_updates(conn)) == (T0, [])


def test_unchanged_rate_does_nothing(conn):
    arrange_account(conn, interest_rate=5.0)
    change_rate(conn, 5.0)
    assert (account(conn)["last_interest_rate_change_ts"], account_updates(conn)) == (T0, [])


def test_stale_rate_change_is_ignored(conn):
    arrange_account(conn)
    change_rate(conn, 7.0, ts=NOW - DAY - MICROSECOND)
    assert (account(conn)["interest_rate"], account_updates(conn)) == (0.0, [])


def test_rate_change_one_day_old_applies(conn):
    arrange_account(conn)
    change_rate(conn, 7.0, ts=NOW - DAY)
    assert account(conn)["interest_rate"] == 7.0


def test_rate_with_more_digits_than_single_precision_is_applied_once(conn):
    # The comparison hazard: 3.567 is stored as 3.566999912...; comparing the
    # stored REAL with the double 3.567 would "change" it every 8 days.
    arrange_account(conn)
    change_rate(conn, 3.567)
    change_rate(conn, 3.567, now=NOW + 8 * DAY)
    assert stored_rate(conn) == single_precision(conn, 3.567)
    assert account(conn)["last_interest_rate_change_ts"] == NOW
    assert len(account_updates(conn)) == 1


def test_rate_change_freezes_interest_accrued_under_the_old_rate(conn):
    year_ago = NOW - dt.timedelta(seconds=SECONDS_IN_YEAR)
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=year_ago, principal=1000, interest_rate=10.0)
    change_rate(conn, 0.0)
    row = account(conn)
    assert (row["principal"], row["interest"]) == (1000, pytest.approx(100.0, abs=1e-6))
    assert row["last_change_ts"] == NOW


def test_rate_change_does_not_set_pending_account_update(conn):
    arrange_account(conn, pending_account_update=True)
    change_rate(conn, 7.0)
    assert (account(conn)["pending_account_update"], account(conn)["last_heartbeat_ts"]) == (False, NOW)


# Debtor info (spec 02 §2.8, edge case 8) ---------------------------------------------------------


def test_debtor_info_update_on_missing_account_does_nothing(conn):
    update_info(conn)
    assert (account(conn), account_updates(conn)) == (None, [])


def test_debtor_info_update_on_deleted_account_does_nothing(conn):
    arrange_account(conn, status_flags=STATUS_DELETED)
    update_info(conn)
    assert (account(conn)["debtor_info_iri"], account_updates(conn)) == (None, [])


def test_debtor_info_update_on_root_account_does_nothing(conn):
    arrange_account(conn, creditor_id=0)
    update_info(conn, creditor_id=0)
    assert (account(conn, 0)["debtor_info_iri"], account_updates(conn)) == (None, [])


def test_debtor_info_update_stores_the_triple(conn):
    arrange_account(conn, last_change_seqnum=4)
    update_info(conn)
    row = account(conn)
    assert (row["debtor_info_iri"], row["debtor_info_content_type"], row["debtor_info_sha256"]) == (
        IRI,
        CONTENT_TYPE,
        SHA256,
    )
    assert (row["last_change_seqnum"], row["last_change_ts"]) == (5, NOW)


def test_debtor_info_update_emits_an_account_update_with_the_triple(conn):
    arrange_account(conn)
    update_info(conn)
    updates = account_updates(conn)
    assert [
        (u["debtor_info_iri"], u["debtor_info_content_type"], u["debtor_info_sha256"], u["inserted_at"])
        for u in updates
    ] == [(IRI, CONTENT_TYPE, SHA256, NOW)]


def test_repeated_debtor_info_update_emits_nothing(conn):
    arrange_account(conn)
    update_info(conn)
    update_info(conn, now=NOW + DAY)
    assert len(account_updates(conn)) == 1
    assert account(conn)["last_change_ts"] == NOW


@pytest.mark.parametrize(
    "changed",
    [
        {"iri": None},
        {"content_type": None},
        {"sha256": None},
        {"iri": ""},
        {"sha256": bytes(32)},
    ],
)
def test_debtor_info_update_with_any_field_changed_applies(conn, changed):
    arrange_account(conn, debtor_info_iri=IRI, debtor_info_content_type=CONTENT_TYPE, debtor_info_sha256=SHA256)
    update_info(conn, **changed)
    assert len(account_updates(conn)) == 1


def test_debtor_info_update_to_all_absent_when_already_absent_does_nothing(conn):
    arrange_account(conn)
    update_info(conn, None, None, None)
    assert account_updates(conn) == []


def test_stale_debtor_info_update_is_ignored(conn):
    arrange_account(conn)
    update_info(conn, ts=NOW - DAY - MICROSECOND)
    assert (account(conn)["debtor_info_iri"], account_updates(conn)) == (None, [])


def test_debtor_info_update_keeps_the_interest_accrued_so_far(conn):
    # A fix of spec 02 §2.8: moving last_change_ts without folding the accrued
    # interest into the interest column would lose a year of 10 % here.
    year_ago = NOW - dt.timedelta(seconds=SECONDS_IN_YEAR)
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=year_ago, principal=1000, interest_rate=10.0, interest=3.0)
    update_info(conn)
    row = account(conn)
    assert row["last_change_ts"] == NOW
    assert row["interest"] == pytest.approx(1003 * 1.1 - 1000, abs=1e-6)


# Initialisation (spec 02 §2.3 step 2, edge case 11) --------------------------------------------------


def test_initialisation_sets_the_root_configs_rate(conn):
    arrange_account(conn)
    initialize(conn, '{"rate": 3.567}')
    updates = account_updates(conn)
    assert [u["interest_rate"] for u in updates] == [pytest.approx(3.567, rel=1e-7)]
    assert stored_rate(conn) == single_precision(conn, 3.567)


def test_initialisation_sets_rate_then_debtor_info(conn):
    sha256_hex = SHA256.hex().upper()
    arrange_account(conn, last_change_seqnum=1)
    initialize(
        conn,
        '{"rate": 2.5, "info": {"iri": "' + IRI + '", "contentType": "text/html", "sha256": "' + sha256_hex + '"}}',
    )
    updates = account_updates(conn)
    assert [(u["last_change_seqnum"], u["interest_rate"], u["debtor_info_iri"]) for u in updates] == [
        (2, 2.5, None),
        (3, 2.5, IRI),
    ]
    assert (updates[1]["debtor_info_content_type"], updates[1]["debtor_info_sha256"]) == ("text/html", SHA256)


def test_initialisation_keeps_empty_info_strings_as_given(conn):
    arrange_account(conn)
    initialize(conn, '{"info": {"iri": "", "contentType": ""}}')
    row = account(conn)
    info = (row["debtor_info_iri"], row["debtor_info_content_type"], row["debtor_info_sha256"])
    assert info == ("", "", None)


def test_initialisation_with_zero_rate_and_no_info_emits_nothing(conn):
    arrange_account(conn)
    initialize(conn, "")
    assert account_updates(conn) == []


@pytest.mark.parametrize("root_config_data", [None, "INVALID_CONFIG"])
def test_initialisation_without_a_valid_root_config_does_nothing(conn, root_config_data):
    arrange_account(conn)
    initialize(conn, root_config_data)
    assert account_updates(conn) == []


def test_initialisation_of_recently_changed_rate_keeps_the_rate(conn):
    arrange_account(conn, interest_rate=1.0, last_interest_rate_change_ts=NOW - DAY)
    initialize(conn, '{"rate": 5.0, "info": {"iri": "' + IRI + '"}}')
    row = account(conn)
    assert (row["interest_rate"], row["debtor_info_iri"]) == (1.0, IRI)
