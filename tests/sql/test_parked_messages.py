"""Parked messages (sql/functions/90_parked_messages.sql): parked once, capped per
source and reason, listed by id, locked for replay, discarded."""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any

import psycopg
from factories import DEFAULT_NOW
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pyswpt import schema

LATER = DEFAULT_NOW + dt.timedelta(minutes=5)
QUEUE = "swpt_accounts"
OTHER_QUEUE = "swpt_accounts_other"
SMALL_CAP = 3


def park(
    conn: psycopg.Connection,
    body: bytes,
    *,
    source_name: str = QUEUE,
    routing_key: str = "0.1.1",
    reason_code: str = "invalid",
    attempts: int = 1,
    now: dt.datetime = DEFAULT_NOW,
    max_per_reason: int = 100,
) -> str:
    return conn.execute(
        """
        SELECT park_message(
            p_source_kind => 'queue',
            p_source_name => %(source_name)s,
            p_exchange => 'accounts_in',
            p_routing_key => %(routing_key)s,
            p_message_type => 'PendingBalanceChange',
            p_content_type => 'application/json',
            p_headers => %(headers)s,
            p_body => %(body)s,
            p_row_data => NULL,
            p_debtor_id => -2,
            p_creditor_id => 7,
            p_reason_code => %(reason_code)s,
            p_reason => 'refused by the database',
            p_sqlstate => '23514',
            p_attempts => %(attempts)s,
            p_next_retry_at => NULL,
            p_max_per_reason => %(max_per_reason)s,
            p_now => %(now)s
        )
        """,
        {
            "source_name": source_name,
            "routing_key": routing_key,
            "headers": Jsonb({"message-type": "PendingBalanceChange"}),
            "body": body,
            "reason_code": reason_code,
            "attempts": attempts,
            "max_per_reason": max_per_reason,
            "now": now,
        },
    ).fetchone()[0]


def parked_rows(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute("SELECT * FROM parked_message ORDER BY parked_id").fetchall()


def overflow(conn: psycopg.Connection) -> dict[tuple[str, str], int]:
    rows = conn.execute("SELECT source_name, reason_code, dropped_count FROM parked_message_overflow")
    return {(source, reason): count for source, reason, count in rows}


def park_distinct(conn: psycopg.Connection, count: int, first: int = 0, **options: Any) -> list[str]:
    """Park `count` different messages, {"n": first} and on."""
    return [park(conn, f'{{"n":{n}}}'.encode(), **options) for n in range(first, first + count)]


def test_a_message_is_parked_once_with_its_first_and_last_sighting(conn):
    assert park(conn, b'{"n":1}', attempts=2) == "parked"
    [row] = parked_rows(conn)
    assert row["body"] == b'{"n":1}'
    assert row["attempts"] == 2
    assert row["first_seen_at"] == row["last_seen_at"] == DEFAULT_NOW


def test_the_same_message_again_updates_attempts_and_last_seen(conn):
    park(conn, b'{"n":1}', attempts=2)
    assert park(conn, b'{"n":1}', attempts=1, now=LATER) == "parked_again"
    [row] = parked_rows(conn)
    assert row["attempts"] == 3
    assert (row["first_seen_at"], row["last_seen_at"]) == (DEFAULT_NOW, LATER)


def test_a_redelivery_counted_by_the_broker_raises_attempts_to_its_count(conn):
    park(conn, b'{"n":1}')
    park(conn, b'{"n":1}', attempts=7, now=LATER)
    assert parked_rows(conn)[0]["attempts"] == 7


def test_same_body_with_another_routing_key_or_source_is_another_message(conn):
    park(conn, b'{"n":1}')
    assert park(conn, b'{"n":1}', routing_key="1.0.0") == "parked"
    assert park(conn, b'{"n":1}', source_name=OTHER_QUEUE) == "parked"
    assert len(parked_rows(conn)) == 3


def test_past_the_cap_only_the_overflow_counts(conn):
    assert park_distinct(conn, SMALL_CAP + 2, max_per_reason=SMALL_CAP) == [
        "parked",
        "parked",
        "parked",
        "over_cap",
        "over_cap",
    ]
    assert len(parked_rows(conn)) == SMALL_CAP
    assert overflow(conn) == {(QUEUE, "invalid"): 2}


def test_a_parked_message_seen_again_at_the_cap_is_updated_not_counted(conn):
    park_distinct(conn, SMALL_CAP, max_per_reason=SMALL_CAP)
    assert park(conn, b'{"n":0}', now=LATER, max_per_reason=SMALL_CAP) == "parked_again"
    assert overflow(conn) == {}


def test_overflow_keeps_first_and_last_drop(conn):
    park_distinct(conn, SMALL_CAP, max_per_reason=SMALL_CAP)
    park(conn, b'{"n":100}', max_per_reason=SMALL_CAP)
    park(conn, b'{"n":101}', now=LATER, max_per_reason=SMALL_CAP)
    first, last = conn.execute("SELECT first_dropped_at, last_dropped_at FROM parked_message_overflow").fetchone()
    assert (first, last) == (DEFAULT_NOW, LATER)


def test_each_source_and_reason_has_a_cap_of_its_own(conn):
    park_distinct(conn, SMALL_CAP + 1, max_per_reason=SMALL_CAP)
    other_reason = park_distinct(conn, SMALL_CAP, first=100, reason_code="refused", max_per_reason=SMALL_CAP)
    other_source = park_distinct(conn, SMALL_CAP, first=200, source_name=OTHER_QUEUE, max_per_reason=SMALL_CAP)
    assert other_reason == other_source == ["parked"] * SMALL_CAP
    assert len(parked_rows(conn)) == 3 * SMALL_CAP
    assert overflow(conn) == {(QUEUE, "invalid"): 1}


def list_ids(conn: psycopg.Connection, after_id: int, max_count: int) -> list[int]:
    rows = conn.execute("SELECT parked_id FROM list_parked_messages(%s, %s)", (after_id, max_count))
    return [parked_id for (parked_id,) in rows]


def test_list_pages_by_id_in_order(conn):
    park_distinct(conn, 5)
    ids = list_ids(conn, 0, 100)
    assert len(ids) == 5 and ids == sorted(ids)
    assert list_ids(conn, 0, 2) == ids[:2]
    assert list_ids(conn, ids[1], 2) == ids[2:4]
    assert list_ids(conn, ids[3], 2) == ids[4:]
    assert list_ids(conn, ids[4], 2) == []


def test_the_view_shows_what_and_why_without_the_body(conn):
    park(conn, b'{"n":1}')
    with conn.cursor(row_factory=dict_row) as cursor:
        [row] = cursor.execute("SELECT * FROM parked_messages").fetchall()
    assert list(row) == [
        "parked_id",
        "source_kind",
        "source_name",
        "message_type",
        "debtor_id",
        "creditor_id",
        "reason_code",
        "reason",
        "sqlstate",
        "attempts",
        "first_seen_at",
        "last_seen_at",
        "next_retry_at",
        "routing_key",
        "body_bytes",
    ]
    assert row["body_bytes"] == len(b'{"n":1}')
    assert (row["reason_code"], row["sqlstate"], row["debtor_id"]) == ("invalid", "23514", -2)


def test_get_returns_the_whole_row_or_nothing(conn):
    park(conn, b'{"n":1}')
    park(conn, b'{"n":2}')
    first, second = list_ids(conn, 0, 10)
    [row] = conn.execute("SELECT body, headers FROM get_parked_message(%s)", (first,)).fetchall()
    assert row == (b'{"n":1}', {"message-type": "PendingBalanceChange"})
    assert conn.execute("SELECT * FROM get_parked_message(%s)", (second + 1,)).fetchall() == []


@contextlib.contextmanager
def other_transaction(database_url: str):
    with psycopg.connect(database_url) as other:
        with other.transaction():
            other.execute(f"SET LOCAL search_path = {schema.OWNER_SEARCH_PATH}")
            yield other


def locked_ids(conn: psycopg.Connection, parked_ids: list[int]) -> list[int]:
    rows = conn.execute("SELECT parked_id FROM lock_parked_messages(%s)", (parked_ids,))
    return [parked_id for (parked_id,) in rows]


def test_lock_skips_rows_another_transaction_locked(conn, database_url):
    park_distinct(conn, 3)
    ids = list_ids(conn, 0, 10)
    with other_transaction(database_url) as other:
        assert locked_ids(other, [ids[1]]) == [ids[1]]
        assert locked_ids(conn, ids) == [ids[0], ids[2]]
    assert locked_ids(conn, ids) == ids


def test_lock_takes_only_the_known_ids_asked_for(conn):
    park_distinct(conn, 2)
    first, second = list_ids(conn, 0, 10)
    assert locked_ids(conn, [second + 1, second]) == [second]


def test_discard_returns_how_many_were_there(conn):
    park_distinct(conn, 3)
    ids = list_ids(conn, 0, 10)
    assert conn.execute("SELECT discard_parked_messages(%s)", ([ids[0], ids[2], ids[2] + 1],)).fetchone()[0] == 2
    assert list_ids(conn, 0, 10) == [ids[1]]
    assert conn.execute("SELECT discard_parked_messages(%s)", ([ids[0]],)).fetchone()[0] == 0
