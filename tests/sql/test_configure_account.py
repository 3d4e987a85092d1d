"""configure_account: ConfigureAccount (spec 02 §2.2, §6 edge cases 1-7 and 26; spec 01 §1.2, §1.6)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from factories import (
    CONFIG_SCHEDULED_FOR_DELETION,
    DEFAULT_NOW,
    STATUS_DELETED,
    STATUS_OVERFLOWN,
    T0,
    initial_transfer_id,
    insert_account,
)
from psycopg.rows import dict_row

DEBTOR_ID = -2
CREDITOR_ID = 1099511627778
NOW = DEFAULT_NOW
DAY = dt.timedelta(days=1)
MICROSECOND = dt.timedelta(microseconds=1)
MAX_DELAY_SECONDS = 7 * 86400.0
MIN_INT32 = -2147483648
MAX_INT32 = 2147483647
SECONDS_IN_YEAR = 31557600


def configure(
    conn: psycopg.Connection,
    *,
    creditor_id: int = CREDITOR_ID,
    ts: dt.datetime = NOW,
    seqnum: int = 0,
    negligible_amount: float = 0.0,
    config_flags: int = 0,
    config_data: str = "",
    max_delay_seconds: float = MAX_DELAY_SECONDS,
    now: dt.datetime = NOW,
) -> bool:
    row = conn.execute(
        "SELECT configure_account(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            DEBTOR_ID,
            creditor_id,
            ts,
            seqnum,
            negligible_amount,
            config_flags,
            config_data,
            max_delay_seconds,
            now,
        ),
    ).fetchone()
    assert row is not None
    return row[0]


def fetch_rows(conn: psycopg.Connection, query: str, params: tuple = ()) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(query, params).fetchall()


def account(conn: psycopg.Connection, creditor_id: int = CREDITOR_ID) -> dict[str, Any] | None:
    rows = fetch_rows(conn, "SELECT * FROM account WHERE debtor_id = %s AND creditor_id = %s", (DEBTOR_ID, creditor_id))
    return rows[0] if rows else None


def account_updates(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return fetch_rows(conn, "SELECT * FROM account_update_signal ORDER BY signal_id")


def rejected_configs(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return fetch_rows(conn, "SELECT * FROM rejected_config_signal ORDER BY signal_id")


def is_reachable(conn: psycopg.Connection, creditor_id: int = CREDITOR_ID) -> bool:
    return conn.execute("SELECT is_reachable_account(%s, %s)", (DEBTOR_ID, creditor_id)).fetchone()[0]


def served_config(conn: psycopg.Connection, creditor_id: int) -> str | None:
    """What the fetch API's `config` endpoint serves (None = 404)."""
    return conn.execute("SELECT get_account_config_data(%s, %s)", (DEBTOR_ID, creditor_id)).fetchone()[0]


# Creation (edge case 1) ---------------------------------------------------------------


def test_first_valid_config_creates_account_with_zero_balance(conn):
    assert configure(conn, ts=NOW - DAY, seqnum=5, negligible_amount=3.0, config_flags=0x1FF0) is True
    row = account(conn)
    assert row is not None
    assert (row["principal"], row["interest"], row["interest_rate"]) == (0, 0.0, 0.0)
    assert (row["config_flags"], row["negligible_amount"], row["config_data"]) == (0x1FF0, 3.0, "")
    assert (row["last_config_ts"], row["last_config_seqnum"]) == (NOW - DAY, 5)
    assert (row["creation_date"], row["last_transfer_id"]) == (NOW.date(), initial_transfer_id(NOW.date()))
    assert (row["status_flags"], row["last_interest_rate_change_ts"]) == (0, T0)


def test_new_account_records_one_change_at_now(conn):
    configure(conn, ts=NOW - DAY)
    row = account(conn)
    assert (row["last_change_seqnum"], row["last_change_ts"]) == (1, NOW)
    assert (row["last_heartbeat_ts"], row["pending_account_update"]) == (NOW, False)


def test_first_config_emits_one_account_update_echoing_the_account(conn):
    configure(conn, ts=NOW - DAY, seqnum=5, negligible_amount=0.1, config_flags=0x1FF0)
    updates = account_updates(conn)
    assert len(updates) == 1
    update = updates[0]
    del update["signal_id"]
    assert update == {
        "debtor_id": DEBTOR_ID,
        "creditor_id": CREDITOR_ID,
        "last_change_ts": NOW,
        "last_change_seqnum": 1,
        "principal": 0,
        "interest": 0.0,
        "interest_rate": 0.0,
        "last_interest_rate_change_ts": T0,
        "last_transfer_number": 0,
        "last_transfer_committed_at": T0,
        "last_config_ts": NOW - DAY,
        "last_config_seqnum": 5,
        "creation_date": NOW.date(),
        "negligible_amount": pytest.approx(0.1, rel=1e-7),
        "config_data": "",
        "config_flags": 0x1FF0,
        "debtor_info_iri": None,
        "debtor_info_content_type": None,
        "debtor_info_sha256": None,
        "inserted_at": NOW,
        "flushed_at_commit": True,  # a synchronous commit wrote it
    }


def test_first_config_emits_no_rejected_config(conn):
    configure(conn)
    assert rejected_configs(conn) == []


def test_config_with_scheduled_for_deletion_bit_creates_the_account(conn):
    assert configure(conn, config_flags=CONFIG_SCHEDULED_FOR_DELETION) is True
    assert account(conn)["config_flags"] == CONFIG_SCHEDULED_FOR_DELETION


# Ordering by (ts, seqnum) (edge cases 2 and 3, spec 02 §3.9) ---------------------------------


def test_same_ts_and_seqnum_again_is_ignored(conn):
    configure(conn, seqnum=7)
    assert configure(conn, seqnum=7, negligible_amount=5.0) is False
    assert len(account_updates(conn)) == 1
    assert account(conn)["negligible_amount"] == 0.0


def test_same_ts_with_next_seqnum_is_applied(conn):
    configure(conn, seqnum=7)
    assert configure(conn, seqnum=8, negligible_amount=5.0) is False
    row = account(conn)
    assert (row["negligible_amount"], row["last_config_seqnum"], row["last_change_seqnum"]) == (5.0, 8, 2)
    assert [u["last_change_seqnum"] for u in account_updates(conn)] == [1, 2]


def test_same_ts_with_earlier_seqnum_is_ignored_without_rejection(conn):
    configure(conn, seqnum=0)
    configure(conn, seqnum=-1, negligible_amount=-1.0)
    assert (len(account_updates(conn)), rejected_configs(conn)) == (1, [])
    assert account(conn)["last_config_seqnum"] == 0


def test_earlier_ts_with_later_seqnum_is_ignored(conn):
    configure(conn, ts=NOW, seqnum=0)
    configure(conn, ts=NOW - MICROSECOND, seqnum=1, negligible_amount=5.0)
    assert len(account_updates(conn)) == 1
    assert account(conn)["negligible_amount"] == 0.0


def test_later_ts_with_earlier_seqnum_is_applied(conn):
    configure(conn, ts=NOW - DAY, seqnum=100)
    configure(conn, ts=NOW - DAY + MICROSECOND, seqnum=3, negligible_amount=5.0)
    assert (account(conn)["last_config_seqnum"], account(conn)["negligible_amount"]) == (3, 5.0)


def test_seqnum_wraps_around_from_max_to_min_int32(conn):
    configure(conn, seqnum=MAX_INT32)
    configure(conn, seqnum=MIN_INT32, negligible_amount=5.0)
    assert account(conn)["last_config_seqnum"] == MIN_INT32


@pytest.mark.parametrize(("first", "second"), [(0, MIN_INT32), (MIN_INT32, 0), (-5, MAX_INT32 - 4)])
def test_seqnums_exactly_2_31_apart_are_not_later(conn, first, second):
    configure(conn, seqnum=first)
    configure(conn, seqnum=second, negligible_amount=5.0)
    assert account(conn)["last_config_seqnum"] == first
    assert len(account_updates(conn)) == 1


# Age of the message (edge case 5) --------------------------------------------------------


def test_too_old_config_for_missing_account_is_ignored(conn):
    old_ts = NOW - 1000 * DAY
    assert configure(conn, ts=old_ts, max_delay_seconds=900 * 86400.0) is False
    assert (account(conn), account_updates(conn), rejected_configs(conn)) == (None, [], [])


def test_too_old_invalid_config_for_missing_account_is_not_rejected(conn):
    configure(conn, ts=NOW - 8 * DAY, negligible_amount=-1.0)
    assert rejected_configs(conn) == []


def test_config_exactly_max_delay_old_creates_the_account(conn):
    assert configure(conn, ts=NOW - dt.timedelta(seconds=MAX_DELAY_SECONDS)) is True
    assert account(conn) is not None


def test_config_in_the_future_creates_the_account(conn):
    assert configure(conn, ts=NOW + 1000 * DAY) is True
    assert account(conn)["last_config_ts"] == NOW + 1000 * DAY


def test_old_config_for_existing_account_is_applied(conn):
    configure(conn, ts=NOW - 1000 * DAY, now=NOW - 1000 * DAY)
    configure(conn, ts=NOW - 999 * DAY, negligible_amount=5.0)
    row = account(conn)
    assert (row["last_config_ts"], row["negligible_amount"]) == (NOW - 999 * DAY, 5.0)


# Invalid configurations (edge case 4) ----------------------------------------------------


def test_invalid_config_is_rejected_echoing_the_message(conn):
    applied = configure(conn, ts=NOW - DAY, seqnum=123, negligible_amount=-10.0, config_flags=0x1FFF, config_data="xxx")
    assert applied is False
    rejections = rejected_configs(conn)
    assert len(rejections) == 1
    rejection = rejections[0]
    del rejection["signal_id"]
    assert rejection == {
        "debtor_id": DEBTOR_ID,
        "creditor_id": CREDITOR_ID,
        "config_ts": NOW - DAY,
        "config_seqnum": 123,
        "config_flags": 0x1FFF,
        "config_data": "xxx",
        "negligible_amount": -10.0,
        "rejection_code": "INVALID_CONFIGURATION",
        "inserted_at": NOW,
        "flushed_at_commit": True,  # a synchronous commit wrote it
    }


def test_invalid_config_creates_no_account_and_no_update(conn):
    configure(conn, negligible_amount=-10.0, config_data="xxx")
    assert (account(conn), account_updates(conn)) == (None, [])


def test_negative_negligible_amount_alone_is_rejected(conn):
    configure(conn, negligible_amount=-0.1)
    assert account(conn) is None
    assert rejected_configs(conn)[0]["negligible_amount"] == pytest.approx(-0.1)


def test_nan_negligible_amount_is_rejected(conn):
    configure(conn, negligible_amount=float("nan"))
    assert (account(conn), len(rejected_configs(conn))) == (None, 1)


def test_config_data_on_a_normal_account_is_rejected(conn):
    configure(conn, config_data='{"rate": 1.0}')
    assert (account(conn), len(rejected_configs(conn))) == (None, 1)


def test_rejected_newer_config_leaves_the_existing_account_unchanged(conn):
    configure(conn, ts=NOW - DAY, negligible_amount=2.0)
    before = account(conn)
    configure(conn, ts=NOW, negligible_amount=-1.0, now=NOW + DAY)
    assert account(conn) == before
    assert (len(account_updates(conn)), len(rejected_configs(conn))) == (1, 1)


# Root accounts (edge case 6) ---------------------------------------------------------------


def test_invalid_root_config_is_rejected_and_no_root_account_is_created(conn):
    assert configure(conn, creditor_id=0, config_data="INVALID_CONFIG") is False
    assert served_config(conn, 0) is None
    assert rejected_configs(conn)[0]["config_data"] == "INVALID_CONFIG"


def test_valid_root_config_is_stored_verbatim(conn):
    configure(conn, creditor_id=0, config_data='{"rate": 1.0}')
    assert served_config(conn, 0) == '{"rate": 1.0}'
    assert account_updates(conn)[0]["config_data"] == '{"rate": 1.0}'


def test_new_root_account_needs_no_initialisation(conn):
    assert configure(conn, creditor_id=0, config_data='{"rate": 1.0}') is False
    assert account(conn, 0) is not None


def test_later_empty_root_config_replaces_the_stored_one(conn):
    configure(conn, creditor_id=0, seqnum=1, config_data='{"rate": 1.0}')
    configure(conn, creditor_id=0, seqnum=2, config_data="")
    assert served_config(conn, 0) == ""


def test_invalid_root_config_keeps_the_stored_one(conn):
    configure(conn, creditor_id=0, seqnum=1, config_data='{"rate": 1.0}')
    configure(conn, creditor_id=0, seqnum=2, config_data='{"rate": 101}')
    assert served_config(conn, 0) == '{"rate": 1.0}'
    assert account(conn, 0)["last_config_seqnum"] == 1


# Scheduled for deletion (edge case 7) ------------------------------------------------------------


def test_scheduling_for_deletion_makes_the_account_unreachable(conn):
    configure(conn, seqnum=1)
    configure(conn, seqnum=2, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    assert is_reachable(conn) is False


def test_newer_config_without_the_bit_makes_the_account_reachable_again(conn):
    configure(conn, seqnum=1, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    configure(conn, seqnum=2, config_flags=0)
    assert is_reachable(conn) is True


# Existing accounts: B2 with zero deltas, then B1 ---------------------------------------------------


def test_applied_config_increments_the_seqnum_once_and_announces_it(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=NOW - DAY, last_change_seqnum=41, pending_account_update=True)
    assert configure(conn, negligible_amount=5.0) is False
    row = account(conn)
    assert (row["last_change_seqnum"], row["last_change_ts"]) == (42, NOW)
    assert row["pending_account_update"] is False
    assert [(u["last_change_seqnum"], u["negligible_amount"]) for u in account_updates(conn)] == [(42, 5.0)]


def test_applied_config_folds_accrued_interest_into_the_interest_column(conn):
    year_ago = NOW - dt.timedelta(seconds=SECONDS_IN_YEAR)
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=year_ago, principal=1000, interest_rate=10.0)
    configure(conn)
    assert account(conn)["interest"] == pytest.approx(100.0, abs=1e-6)
    assert account_updates(conn)[0]["interest"] == pytest.approx(100.0, abs=1e-6)


def test_applied_config_does_not_move_last_change_ts_back(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=NOW + DAY)
    configure(conn)
    assert account(conn)["last_change_ts"] == NOW + DAY


def test_applied_config_on_existing_account_needs_no_initialisation(conn):
    insert_account(conn, DEBTOR_ID, CREDITOR_ID, now=NOW - DAY)
    assert configure(conn) is False


# Resurrection (edge case 26) -------------------------------------------------------------


def arrange_deleted_account(conn: psycopg.Connection, creditor_id: int = CREDITOR_ID) -> dict[str, Any]:
    created = NOW - 2000 * DAY
    return insert_account(
        conn,
        DEBTOR_ID,
        creditor_id,
        now=created,
        status_flags=STATUS_DELETED | STATUS_OVERFLOWN,
        config_flags=CONFIG_SCHEDULED_FOR_DELETION,
        last_config_ts=created,
        last_config_seqnum=0,
        interest_rate=10.0,
        previous_interest_rate=5.0,
        last_interest_rate_change_ts=created,
        last_transfer_number=12,
        last_transfer_id=initial_transfer_id(created.date()) + 30,
        debtor_info_iri="https://example.com/debtor",
        debtor_info_content_type="text/html",
        debtor_info_sha256=bytes(32),
    )


def test_newer_config_resurrects_a_deleted_account(conn):
    before = arrange_deleted_account(conn)
    ts = before["last_config_ts"] + 1000 * DAY
    assert configure(conn, ts=ts, seqnum=0) is True
    row = account(conn)
    assert (row["status_flags"] & STATUS_DELETED, row["config_flags"]) == (0, 0)
    assert is_reachable(conn) is True


def test_resurrection_keeps_creation_date_numbers_rates_and_debtor_info(conn):
    before = arrange_deleted_account(conn)
    configure(conn, ts=before["last_config_ts"] + 1000 * DAY)
    row = account(conn)
    kept = [
        "creation_date",
        "last_transfer_number",
        "last_transfer_id",
        "interest_rate",
        "previous_interest_rate",
        "last_interest_rate_change_ts",
        "debtor_info_iri",
        "debtor_info_content_type",
        "debtor_info_sha256",
    ]
    assert {k: row[k] for k in kept} == {k: before[k] for k in kept}
    assert row["status_flags"] == STATUS_OVERFLOWN


def test_resurrection_emits_one_account_update(conn):
    before = arrange_deleted_account(conn)
    configure(conn, ts=before["last_config_ts"] + 1000 * DAY)
    updates = account_updates(conn)
    assert [(u["last_change_seqnum"], u["interest_rate"]) for u in updates] == [(1, 10.0)]


def test_deleted_account_has_no_age_limit_for_newer_configs(conn):
    before = arrange_deleted_account(conn)
    ts = before["last_config_ts"] + DAY  # far older than the maximum delay
    assert configure(conn, ts=ts) is True
    assert account(conn)["status_flags"] & STATUS_DELETED == 0


def test_config_not_newer_than_the_deleted_accounts_is_ignored(conn):
    before = arrange_deleted_account(conn)
    assert configure(conn, ts=before["last_config_ts"], seqnum=0) is False
    assert account(conn)["status_flags"] & STATUS_DELETED == STATUS_DELETED
    assert account_updates(conn) == []


def test_invalid_config_does_not_resurrect_a_deleted_account(conn):
    before = arrange_deleted_account(conn)
    configure(conn, ts=before["last_config_ts"] + DAY, negligible_amount=-1.0)
    assert account(conn)["status_flags"] & STATUS_DELETED == STATUS_DELETED


def test_resurrected_root_account_needs_no_initialisation(conn):
    before = arrange_deleted_account(conn, creditor_id=0)
    assert configure(conn, creditor_id=0, ts=before["last_config_ts"] + DAY) is False
    assert account(conn, 0)["status_flags"] & STATUS_DELETED == 0
