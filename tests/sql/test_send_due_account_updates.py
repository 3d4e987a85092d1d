"""send_due_account_updates: prompt AccountUpdates for changed accounts (issue 12, point 4)."""

import datetime as dt

import psycopg
from factories import DEFAULT_NOW, STATUS_DELETED, insert_account

from pyswpt import schema
from pyswpt.sharding import Realm

DEBTOR = 7
INTERVAL_SECONDS = 5.0
NOW = DEFAULT_NOW
EVERYWHERE = Realm.from_binding_key("#")


def send_due(conn: psycopg.Connection, *, max_count: int = 100, realm: Realm = EVERYWHERE, now=NOW) -> int:
    return conn.execute(
        "SELECT send_due_account_updates(%s, %s, %s, %s, %s)",
        (INTERVAL_SECONDS, max_count, realm.mask, realm.realm, now),
    ).fetchone()[0]


def announced(conn: psycopg.Connection) -> list[int]:
    rows = conn.execute("SELECT creditor_id FROM account_update_signal ORDER BY creditor_id").fetchall()
    return [creditor_id for (creditor_id,) in rows]


def pending_account(conn: psycopg.Connection, creditor_id: int, announced_seconds_ago: float, **overrides) -> None:
    insert_account(
        conn,
        DEBTOR,
        creditor_id,
        now=NOW - dt.timedelta(seconds=60),
        last_heartbeat_ts=NOW - dt.timedelta(seconds=announced_seconds_ago),
        pending_account_update=True,
        **overrides,
    )


def test_a_changed_account_is_announced_once_with_its_stored_state(conn):
    pending_account(conn, 1, announced_seconds_ago=INTERVAL_SECONDS, principal=500)
    assert send_due(conn) == 1
    row = conn.execute("SELECT principal, inserted_at FROM account_update_signal").fetchone()
    assert row == (500, NOW)
    account = conn.execute("SELECT pending_account_update, last_heartbeat_ts FROM account").fetchone()
    assert account == (False, NOW)
    assert send_due(conn, now=NOW + dt.timedelta(hours=1)) == 0


def test_an_account_announced_within_the_interval_waits_for_it(conn):
    pending_account(conn, 1, announced_seconds_ago=INTERVAL_SECONDS - 1)
    assert send_due(conn) == 0
    assert send_due(conn, now=NOW + dt.timedelta(seconds=1)) == 1
    assert announced(conn) == [1]


def test_unchanged_deleted_and_foreign_accounts_are_not_announced(conn):
    insert_account(conn, DEBTOR, 1, now=NOW - dt.timedelta(days=1))
    pending_account(conn, 2, announced_seconds_ago=60, status_flags=STATUS_DELETED)
    pending_account(conn, 3, announced_seconds_ago=60)
    own_half, other_half = sorted(map(Realm.from_binding_key, ("0.#", "1.#")), key=lambda r: not r.owns(DEBTOR, 3))
    assert send_due(conn, realm=other_half) == 0
    assert send_due(conn, realm=own_half) == 1
    assert announced(conn) == [3]


def test_the_longest_waiting_accounts_go_first_up_to_max_count(conn):
    for creditor_id, seconds_ago in ((1, 10), (2, 30), (3, 20)):
        pending_account(conn, creditor_id, announced_seconds_ago=seconds_ago)
    assert send_due(conn, max_count=2) == 2
    assert announced(conn) == [2, 3]


def test_an_account_locked_by_a_worker_is_skipped_not_waited_for(conn, database_url):
    pending_account(conn, 1, announced_seconds_ago=60)
    pending_account(conn, 2, announced_seconds_ago=60)
    with psycopg.connect(database_url) as worker:
        worker.execute("SELECT 1 FROM pyswpt.account WHERE creditor_id = 1 FOR UPDATE")
        conn.execute("SET lock_timeout = '5s'")
        assert send_due(conn) == 1
    assert announced(conn) == [2]
    assert send_due(conn) == 1
    assert announced(conn) == [1, 2]


def test_due_accounts_are_found_through_the_partial_index(conn):
    for creditor_id in range(1, 2001):
        insert_account(conn, DEBTOR, creditor_id, now=NOW - dt.timedelta(days=1))
    pending_account(conn, 5000, announced_seconds_ago=60)
    conn.execute("ANALYZE pyswpt.account")
    conn.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
    plan = conn.execute(
        "EXPLAIN SELECT * FROM account WHERE pending_account_update AND last_heartbeat_ts <= %s"
        " ORDER BY last_heartbeat_ts LIMIT 100",
        (NOW,),
    ).fetchall()
    assert "account_pending_update_idx" in "\n".join(line for (line,) in plan)
