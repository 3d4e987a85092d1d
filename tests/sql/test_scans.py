"""The scanners' steps (spec 02 §2.11-§2.14, §4.3-§4.5): parent-shard cleanup,
purge, heartbeats, chore selection, reminders, archive cleanup and the heap reader."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator

import psycopg
import pytest
from balance_steps import DAY, WHOLE_REALM, account, rows, signals, value
from factories import (
    CONFIG_SCHEDULED_FOR_DELETION,
    DEFAULT_NOW,
    STATUS_DELETED,
    T0,
    insert_account,
)

NOW = DEFAULT_NOW
OLD = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
SCHEDULED = CONFIG_SCHEDULED_FOR_DELETION

# Settings at the reference's defaults (spec 02 §0).
INTRANET_EXTREME_DELAY_DAYS = 14.0
PREPARED_TRANSFER_MAX_DELAY_DAYS = 90.0
PURGE_DELAY = (INTRANET_EXTREME_DELAY_DAYS + PREPARED_TRANSFER_MAX_DELAY_DAYS + 2) * DAY  # 106 days
MESSAGE_MAX_DELAY_DAYS = 7.0
ACCOUNT_HEARTBEAT_DAYS = 7.0
PREPARED_TRANSFER_REMAINDER_DAYS = 7.0
DELETION_ATTEMPTS_MIN_DAYS = 14.0
MIN_INTEREST_CAPITALIZATION_DAYS = 14.0
MAX_INTEREST_TO_PRINCIPAL_RATIO = 0.01

# Realms of spec 01 §4.1 and pairs of its test vectors (§4.2).
REALM_1 = (0x80000000, 0x80000000)  # binding key 1.#
REALM_01 = (0x40000000 | 0x80000000, 0x40000000)  # binding key 0.1.#
PARENT_OF_REALM_01 = (0x80000000, 0x00000000)
PAIR_IN_1 = (1, 2)  # K = 0xf014c44f
PAIR_IN_0 = (123, 456)  # K = 0x084434f0
PAIR_IN_01 = (1, 3)  # in 0.1.# and in its parent 0.#
PAIR_IN_PARENT_ONLY = (123, 456)  # in 0.# but not in 0.1.#
PAIR_IN_NEITHER = (1, 2)  # in 1.#: neither 0.1.# nor 0.#


def key_arrays(*pairs: tuple[int, ...]) -> list[list[int]]:
    return [list(column) for column in zip(*pairs, strict=True)] if pairs else [[], []]


@contextlib.contextmanager
def row_locked_elsewhere(database_url: str, table: str, where: str) -> Iterator[None]:
    """Hold a row lock in another transaction, as a concurrent operation would."""
    with psycopg.connect(database_url) as other:
        other.execute(f"SELECT 1 FROM pyswpt.{table} WHERE {where} FOR UPDATE")
        yield
        other.rollback()


# Parent-shard cleanup (§4.4 step 1) ---------------------------------------------------------


def delete_parent_shard_accounts(conn, *pairs):
    return value(
        conn,
        "SELECT delete_parent_shard_accounts(%s::bigint[], %s::bigint[], %s, %s, %s, %s)",
        (*key_arrays(*pairs), *REALM_01, *PARENT_OF_REALM_01),
    )


def test_accounts_of_the_parent_shard_only_are_deleted_silently(conn):
    insert_account(conn, *PAIR_IN_PARENT_ONLY)
    assert delete_parent_shard_accounts(conn, PAIR_IN_PARENT_ONLY) == 1
    assert account(conn, *PAIR_IN_PARENT_ONLY) is None
    assert signals(conn, "account_purge_signal") == []
    assert signals(conn, "account_update_signal") == []


def test_accounts_of_this_shard_survive_parent_cleanup(conn):
    insert_account(conn, *PAIR_IN_01)
    assert delete_parent_shard_accounts(conn, PAIR_IN_01) == 0
    assert account(conn, *PAIR_IN_01) is not None


def test_accounts_outside_the_parent_survive_parent_cleanup(conn):
    insert_account(conn, *PAIR_IN_NEITHER)
    assert delete_parent_shard_accounts(conn, PAIR_IN_NEITHER) == 0


def test_parent_cleanup_takes_prepared_transfers_along(conn):
    insert_account(conn, *PAIR_IN_PARENT_ONLY, pending_transfers_count=1, total_locked_amount=5)
    insert_prepared_transfer(conn, *PAIR_IN_PARENT_ONLY, transfer_id=1)
    delete_parent_shard_accounts(conn, PAIR_IN_PARENT_ONLY)
    assert rows(conn, "SELECT * FROM prepared_transfer") == []


def test_parent_cleanup_skips_rows_locked_elsewhere(conn, database_url):
    insert_account(conn, *PAIR_IN_PARENT_ONLY)
    with row_locked_elsewhere(database_url, "account", "debtor_id = 123"):
        assert delete_parent_shard_accounts(conn, PAIR_IN_PARENT_ONLY) == 0
    assert delete_parent_shard_accounts(conn, PAIR_IN_PARENT_ONLY) == 1


# Purge (§2.12) ---------------------------------------------------------------------------------


def purge(conn, *pairs, realm=WHOLE_REALM, now=NOW):
    return value(
        conn,
        "SELECT purge_deleted_accounts(%s::bigint[], %s::bigint[], %s, %s, %s, %s, %s)",
        (*key_arrays(*pairs), INTRANET_EXTREME_DELAY_DAYS, PREPARED_TRANSFER_MAX_DELAY_DAYS, *realm, now),
    )


def insert_deleted_account(conn, debtor_id=1, creditor_id=2, *, changed_at=NOW - PURGE_DELAY - DAY, **overrides):
    overrides.setdefault("creation_date", dt.date(2023, 1, 1))
    return insert_account(conn, debtor_id, creditor_id, now=changed_at, status_flags=STATUS_DELETED, **overrides)


def test_account_deleted_over_106_days_ago_is_purged_with_account_purge(conn):
    insert_deleted_account(conn, creation_date=dt.date(2023, 5, 6))
    assert purge(conn, (1, 2)) == 1
    assert account(conn, 1, 2) is None
    [purged] = signals(conn, "account_purge_signal")
    assert (purged["debtor_id"], purged["creditor_id"], purged["creation_date"]) == (1, 2, dt.date(2023, 5, 6))
    assert purged["inserted_at"] == NOW


def test_account_deleted_106_days_ago_exactly_is_kept(conn):
    insert_deleted_account(conn, changed_at=NOW - PURGE_DELAY)
    assert purge(conn, (1, 2)) == 0
    assert purge(conn, (1, 2), now=NOW + dt.timedelta(microseconds=1)) == 1


def test_account_deleted_recently_is_kept(conn):
    insert_deleted_account(conn, changed_at=NOW - PURGE_DELAY + DAY)
    assert purge(conn, (1, 2)) == 0
    assert account(conn, 1, 2) is not None


def test_existing_account_is_never_purged(conn):
    insert_account(conn, 1, 2, now=OLD)
    assert purge(conn, (1, 2)) == 0


@pytest.mark.parametrize(("days_before_now", "purged"), [(2, 0), (3, 0), (4, 1)])
def test_account_created_in_the_last_three_days_is_kept(conn, days_before_now, purged):
    # Purging it could let it be re-created under the same creation date.
    insert_deleted_account(conn, creation_date=(NOW - days_before_now * DAY).date())
    assert purge(conn, (1, 2)) == purged


def test_account_of_another_shard_is_not_purged(conn):
    insert_deleted_account(conn, *PAIR_IN_0)
    insert_deleted_account(conn, *PAIR_IN_1)
    assert purge(conn, PAIR_IN_0, PAIR_IN_1, realm=REALM_1) == 1
    assert account(conn, *PAIR_IN_0) is not None
    assert account(conn, *PAIR_IN_1) is None


def test_only_the_given_keys_are_purged(conn):
    insert_deleted_account(conn, 1, 2)
    insert_deleted_account(conn, 1, 3)
    assert purge(conn, (1, 3)) == 1
    assert account(conn, 1, 2) is not None


def test_purge_skips_rows_locked_elsewhere(conn, database_url):
    insert_deleted_account(conn)
    with row_locked_elsewhere(database_url, "account", "debtor_id = 1"):
        assert purge(conn, (1, 2)) == 0
    assert purge(conn, (1, 2)) == 1


# Heartbeats (§2.11) -----------------------------------------------------------------------------


def heartbeat(conn, *pairs, realm=WHOLE_REALM, now=NOW, heartbeat_days=ACCOUNT_HEARTBEAT_DAYS):
    return value(
        conn,
        "SELECT send_account_heartbeats(%s::bigint[], %s::bigint[], %s, %s, %s, %s, %s)",
        (*key_arrays(*pairs), heartbeat_days, MESSAGE_MAX_DELAY_DAYS, *realm, now),
    )


def test_account_without_update_for_over_7_days_gets_a_heartbeat(conn):
    insert_account(conn, 1, 2, now=OLD, principal=5, interest=3.0, last_change_seqnum=4)
    assert heartbeat(conn, (1, 2)) == 1
    [update] = signals(conn, "account_update_signal")
    assert (update["last_change_seqnum"], update["last_change_ts"], update["principal"]) == (4, OLD, 5)
    assert update["interest"] == 3.0
    assert update["inserted_at"] == NOW
    beaten = account(conn, 1, 2)
    assert (beaten["last_heartbeat_ts"], beaten["last_change_seqnum"], beaten["last_change_ts"]) == (NOW, 4, OLD)


def test_account_updated_within_7_days_gets_no_heartbeat(conn):
    insert_account(conn, 1, 2, now=NOW - 6 * DAY)
    assert heartbeat(conn, (1, 2)) == 0
    assert signals(conn, "account_update_signal") == []


def test_heartbeat_interval_is_at_least_the_message_max_delay(conn):
    insert_account(conn, 1, 2, now=NOW - 5 * DAY)
    assert heartbeat(conn, (1, 2), heartbeat_days=3.0) == 0
    assert heartbeat(conn, (1, 2), heartbeat_days=3.0, now=NOW + 3 * DAY) == 1


def test_pending_account_update_is_sent_at_once_and_cleared(conn):
    insert_account(conn, 1, 2, now=NOW - DAY, pending_account_update=True)
    assert heartbeat(conn, (1, 2)) == 1
    assert account(conn, 1, 2)["pending_account_update"] is False
    assert heartbeat(conn, (1, 2)) == 0


def test_heartbeat_ts_is_last_change_ts_when_that_is_later(conn):
    later = NOW + DAY
    insert_account(conn, 1, 2, now=NOW - DAY, last_change_ts=later, pending_account_update=True)
    heartbeat(conn, (1, 2))
    assert signals(conn, "account_update_signal")[0]["inserted_at"] == later


def test_deleted_account_gets_no_heartbeat(conn):
    insert_account(conn, 1, 2, now=OLD, status_flags=STATUS_DELETED, pending_account_update=True)
    assert heartbeat(conn, (1, 2)) == 0


def test_account_of_another_shard_gets_no_heartbeat(conn):
    insert_account(conn, *PAIR_IN_0, now=OLD)
    insert_account(conn, *PAIR_IN_1, now=OLD)
    assert heartbeat(conn, PAIR_IN_0, PAIR_IN_1, realm=REALM_1) == 1
    [update] = signals(conn, "account_update_signal")
    assert (update["debtor_id"], update["creditor_id"]) == PAIR_IN_1


def test_repeated_key_gets_one_heartbeat(conn):
    insert_account(conn, 1, 2, now=OLD)
    assert heartbeat(conn, (1, 2), (1, 2)) == 1


def test_heartbeat_skips_rows_locked_elsewhere(conn, database_url):
    insert_account(conn, 1, 2, now=OLD)
    with row_locked_elsewhere(database_url, "account", "debtor_id = 1"):
        assert heartbeat(conn, (1, 2)) == 0
    assert heartbeat(conn, (1, 2)) == 1


# Chores (§4.4 steps 4-6) ------------------------------------------------------------------------


def chores(conn, *pairs, now=NOW):
    found = rows(
        conn,
        "SELECT * FROM select_account_chores(%s::bigint[], %s::bigint[], %s, %s, %s, %s)",
        (
            *key_arrays(*pairs),
            DELETION_ATTEMPTS_MIN_DAYS,
            MIN_INTEREST_CAPITALIZATION_DAYS,
            MAX_INTEREST_TO_PRINCIPAL_RATIO,
            now,
        ),
    )
    return {(c["debtor_id"], c["creditor_id"]): (c["needs_deletion_attempt"], c["needs_capitalization"]) for c in found}


def test_scheduled_negligible_account_needs_a_deletion_attempt(conn):
    insert_account(conn, 1, 2, config_flags=SCHEDULED, principal=2)
    assert chores(conn, (1, 2)) == {(1, 2): (True, False)}


def test_recent_deletion_attempt_is_not_repeated(conn):
    insert_account(conn, 1, 2, config_flags=SCHEDULED, last_deletion_attempt_ts=NOW - 13 * DAY)
    assert chores(conn, (1, 2)) == {}
    assert chores(conn, (1, 2), now=NOW + DAY) == {(1, 2): (True, False)}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"principal": 3}, {}),
        ({"principal": 100, "negligible_amount": 100.0}, {(1, 2): (True, False)}),
        ({"config_flags": 0}, {}),
        ({"status_flags": STATUS_DELETED}, {}),
    ],
)
def test_deletion_attempt_needs_schedule_and_negligible_balance(conn, overrides, expected):
    insert_account(conn, 1, 2, **{"config_flags": SCHEDULED, **overrides})
    assert chores(conn, (1, 2)) == expected


@pytest.mark.parametrize(("principal", "expected"), [(0, {(1, 0): (True, False)}), (-1, {})])
def test_scheduled_root_needs_a_deletion_attempt_only_with_zero_principal(conn, principal, expected):
    insert_account(conn, 1, 0, config_flags=SCHEDULED, principal=principal)
    assert chores(conn, (1, 0)) == expected


def test_account_with_much_accrued_interest_needs_capitalization(conn):
    # Edge case 49: 2 % and interest 20 on 1000 (ratio 20/1001 > 0.01).
    insert_account(conn, 1, 2, principal=1000, interest=20.0, interest_rate=2.0)
    assert chores(conn, (1, 2)) == {(1, 2): (False, True)}


def test_capitalization_needs_the_ratio_exceeded(conn):
    insert_account(conn, 1, 2, principal=1000, interest=10.0)  # 10/1001 < 0.01
    assert chores(conn, (1, 2)) == {}


def test_negative_accrual_needs_capitalization_too(conn):
    insert_account(conn, 1, 2, principal=1000, interest=-20.0)
    assert chores(conn, (1, 2)) == {(1, 2): (False, True)}


def test_recent_capitalization_is_not_repeated(conn):
    insert_account(conn, 1, 2, principal=1000, interest=20.0, last_interest_capitalization_ts=NOW - 13 * DAY)
    assert chores(conn, (1, 2)) == {}


def test_root_and_deleted_accounts_need_no_capitalization(conn):
    insert_account(conn, 1, 0, principal=1000, interest=20.0)
    insert_account(conn, 1, 2, principal=1000, interest=20.0, status_flags=STATUS_DELETED)
    assert chores(conn, (1, 0), (1, 2)) == {}


def test_debtor_settings_are_read_for_existing_keys(conn):
    sha256 = bytes(range(32))
    insert_account(
        conn,
        1,
        2,
        interest_rate=3.567,
        last_interest_rate_change_ts=NOW - DAY,
        debtor_info_iri="https://x/",
        debtor_info_content_type="text/plain",
        debtor_info_sha256=sha256,
    )
    insert_account(conn, 1, 3, status_flags=STATUS_DELETED)
    found = rows(
        conn,
        "SELECT * FROM get_account_debtor_settings(%s::bigint[], %s::bigint[])",
        key_arrays((1, 2), (1, 3), (1, 4)),
    )
    assert [(f["creditor_id"], f["is_deleted"]) for f in found] == [(2, False), (3, True)]
    first = found[0]
    assert first["interest_rate"] == pytest.approx(3.567, rel=1e-7)
    assert first["last_interest_rate_change_ts"] == NOW - DAY
    assert (first["debtor_info_iri"], first["debtor_info_content_type"], first["debtor_info_sha256"]) == (
        "https://x/",
        "text/plain",
        sha256,
    )


# Prepared-transfer reminders (§2.13) -----------------------------------------------------------


def insert_prepared_transfer(conn, debtor_id=1, sender_creditor_id=2, *, transfer_id=1, prepared_at=OLD, **overrides):
    values = {
        "debtor_id": debtor_id,
        "sender_creditor_id": sender_creditor_id,
        "transfer_id": transfer_id,
        "coordinator_type": "direct",
        "coordinator_id": sender_creditor_id,
        "coordinator_request_id": 77,
        "recipient_creditor_id": 1234,
        "prepared_at": prepared_at,
        "final_interest_rate_ts": T0,
        "demurrage_rate": -50.0,
        "deadline": prepared_at + 90 * DAY,
        "locked_amount": 100,
        "last_reminder_ts": None,
        **overrides,
    }
    conn.execute(
        f"INSERT INTO prepared_transfer ({', '.join(values)}) VALUES ({', '.join(['%s'] * len(values))})",
        list(values.values()),
    )


def remind(conn, *keys, realm=WHOLE_REALM, now=NOW):
    arrays = [list(column) for column in zip(*keys, strict=True)] if keys else [[], [], []]
    return value(
        conn,
        "SELECT send_prepared_transfer_reminders(%s::bigint[], %s::bigint[], %s::bigint[], %s, %s, %s, %s, %s)",
        (*arrays, PREPARED_TRANSFER_REMAINDER_DAYS, MESSAGE_MAX_DELAY_DAYS, *realm, now),
    )


def test_old_prepared_transfer_is_reminded_once_with_its_original_fields(conn):
    insert_account(conn, 1, 2)
    insert_prepared_transfer(conn, transfer_id=1, prepared_at=OLD)
    insert_prepared_transfer(conn, transfer_id=2, prepared_at=NOW - DAY)
    assert remind(conn, (1, 2, 1), (1, 2, 2)) == 1
    [reminder] = signals(conn, "prepared_transfer_signal")
    assert (reminder["transfer_id"], reminder["prepared_at"], reminder["inserted_at"]) == (1, OLD, NOW)
    assert (reminder["coordinator_id"], reminder["coordinator_request_id"], reminder["locked_amount"]) == (2, 77, 100)
    assert (reminder["recipient_creditor_id"], reminder["demurrage_rate"]) == (1234, -50.0)
    assert (reminder["deadline"], reminder["final_interest_rate_ts"]) == (OLD + 90 * DAY, T0)
    reminded = rows(conn, "SELECT transfer_id, last_reminder_ts FROM prepared_transfer ORDER BY transfer_id")
    assert [(r["transfer_id"], r["last_reminder_ts"]) for r in reminded] == [(1, NOW), (2, None)]


def test_immediate_second_scan_sends_no_reminder(conn):
    insert_account(conn, 1, 2)
    insert_prepared_transfer(conn)
    remind(conn, (1, 2, 1))
    assert remind(conn, (1, 2, 1), now=NOW + 6 * DAY) == 0
    assert len(signals(conn, "prepared_transfer_signal")) == 1


def test_reminders_repeat_every_7_days(conn):
    insert_account(conn, 1, 2)
    insert_prepared_transfer(conn)
    remind(conn, (1, 2, 1))
    assert remind(conn, (1, 2, 1), now=NOW + 7 * DAY + dt.timedelta(seconds=1)) == 1
    assert [s["inserted_at"] for s in signals(conn, "prepared_transfer_signal")] == [
        NOW,
        NOW + 7 * DAY + dt.timedelta(seconds=1),
    ]


def test_transfer_prepared_within_7_days_is_not_reminded(conn):
    insert_account(conn, 1, 2)
    insert_prepared_transfer(conn, prepared_at=NOW - 7 * DAY)
    assert remind(conn, (1, 2, 1)) == 0


def test_transfer_of_another_shard_is_not_reminded(conn):
    insert_account(conn, *PAIR_IN_0)
    insert_account(conn, *PAIR_IN_1)
    insert_prepared_transfer(conn, *PAIR_IN_0)
    insert_prepared_transfer(conn, *PAIR_IN_1)
    assert remind(conn, (*PAIR_IN_0, 1), (*PAIR_IN_1, 1), realm=REALM_1) == 1
    [reminder] = signals(conn, "prepared_transfer_signal")
    assert (reminder["debtor_id"], reminder["sender_creditor_id"]) == PAIR_IN_1


def test_reminder_skips_transfers_locked_elsewhere(conn, database_url):
    insert_account(conn, 1, 2)
    insert_prepared_transfer(conn)
    with row_locked_elsewhere(database_url, "prepared_transfer", "transfer_id = 1"):
        assert remind(conn, (1, 2, 1)) == 0
    assert remind(conn, (1, 2, 1)) == 1


# Archive cleanup (§2.14) ------------------------------------------------------------------------


def test_archive_cleanup_deletes_only_old_applied_changes(conn):
    threshold = NOW - 30 * DAY
    for change_id, committed_at, is_applied in [
        (1, threshold - DAY, True),
        (2, threshold - DAY, False),
        (3, threshold + DAY, True),
    ]:
        conn.execute(
            "INSERT INTO registered_balance_change VALUES (1, 2, %s, %s, %s)", (change_id, committed_at, is_applied)
        )
    deleted = value(
        conn,
        "SELECT delete_applied_balance_changes(%s::bigint[], %s::bigint[], %s::bigint[], %s)",
        ([1, 1, 1], [2, 2, 2], [1, 2, 3], threshold),
    )
    assert deleted == 1
    assert [r["change_id"] for r in rows(conn, "SELECT change_id FROM registered_balance_change ORDER BY 1")] == [2, 3]


# Heap reader (§4.3) ---------------------------------------------------------------------------


def test_reader_returns_the_keys_stored_in_a_block_range(conn):
    insert_account(conn, 1, 2)
    insert_account(conn, 1, 3)
    size = rows(conn, "SELECT * FROM get_scanned_table_size('account')")[0]
    assert size["block_count"] >= 1
    found = rows(conn, "SELECT * FROM read_account_keys(0, %s)", (size["block_count"],))
    assert sorted((f["debtor_id"], f["creditor_id"]) for f in found) == [(1, 2), (1, 3)]
    assert rows(conn, "SELECT * FROM read_account_keys(%s, 40)", (size["block_count"],)) == []


def test_reader_covers_prepared_transfers_and_the_archive(conn):
    insert_account(conn, 1, 2)
    insert_prepared_transfer(conn)
    conn.execute("INSERT INTO registered_balance_change VALUES (1, 2, 9, %s, true)", (NOW,))
    assert [tuple(r.values()) for r in rows(conn, "SELECT * FROM read_prepared_transfer_keys(0, 40)")] == [(1, 2, 1)]
    assert [tuple(r.values()) for r in rows(conn, "SELECT * FROM read_registered_balance_change_keys(0, 40)")] == [
        (1, 2, 9)
    ]


def test_size_of_an_unscanned_table_is_refused(conn):
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT * FROM get_scanned_table_size('transfer_request')")
