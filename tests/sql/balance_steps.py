"""Steps shared by the balance-change, capitalization, deletion and scan tests.

They call the public SQL functions the way the drivers will, and read outbox
rows back, so that a test reads as: arrange, act, look at the messages.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
from factories import DEFAULT_NOW, T0
from psycopg.rows import dict_row

MAX_INT64 = 2**63 - 1
MIN_INT64 = -(2**63)
MAX_INT32 = 2**31 - 1
MIN_INT32 = -(2**31)
SECONDS_IN_YEAR = 31_557_600
DAY = dt.timedelta(days=1)
YEAR = dt.timedelta(seconds=SECONDS_IN_YEAR)

# Realm (mask, realm) of the binding key `#`: every account is in it.
WHOLE_REALM = (0, 0)


def rows(conn: psycopg.Connection, query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(query, params).fetchall()


def value(conn: psycopg.Connection, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def account(conn: psycopg.Connection, debtor_id: int, creditor_id: int) -> dict[str, Any] | None:
    found = rows(
        conn,
        "SELECT * FROM account WHERE debtor_id = %s AND creditor_id = %s",
        (debtor_id, creditor_id),
    )
    return found[0] if found else None


# Outbox tables this file reads, with an order that is the order of emission.
SIGNAL_ORDER = {
    "account_transfer_signal": "debtor_id, creditor_id, transfer_number",
    "account_update_signal": "signal_id",
    "account_purge_signal": "debtor_id, creditor_id",
    "prepared_transfer_signal": "signal_id",
    "pending_balance_change_signal": "change_id",
}


def signals(conn: psycopg.Connection, table: str) -> list[dict[str, Any]]:
    """The rows of one outbox table, in the order they were written."""
    return rows(conn, f"SELECT * FROM {table} ORDER BY {SIGNAL_ORDER[table]}")


def register_change(
    conn: psycopg.Connection,
    debtor_id: int,
    creditor_id: int,
    principal_delta: int,
    *,
    other_creditor_id: int = 777,
    change_id: int = 1,
    coordinator_type: str = "direct",
    committed_at: dt.datetime = DEFAULT_NOW,
    note_format: str = "",
    note: str = "",
    threshold: dt.datetime = T0,
) -> bool:
    return value(
        conn,
        "SELECT register_balance_change(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            debtor_id,
            other_creditor_id,
            change_id,
            creditor_id,
            coordinator_type,
            note_format,
            note,
            committed_at,
            principal_delta,
            threshold,
        ),
    )


def process_changes(conn: psycopg.Connection, debtor_id: int, creditor_id: int, now: dt.datetime = DEFAULT_NOW) -> int:
    return value(conn, "SELECT process_balance_changes(%s, %s, %s)", (debtor_id, creditor_id, now))


def pay(
    conn: psycopg.Connection,
    debtor_id: int,
    creditor_id: int,
    amount: int,
    *,
    coordinator_type: str = "test",
    now: dt.datetime = DEFAULT_NOW,
) -> None:
    conn.execute(
        "SELECT make_direct_debtor_payment(%s, %s, %s, %s, '', '', %s)",
        (coordinator_type, debtor_id, creditor_id, amount, now),
    )


def deliver_pending_balance_changes(conn: psycopg.Connection, now: dt.datetime = DEFAULT_NOW) -> int:
    """What the flusher, the consumer and the balance-change processor do together:
    take every PendingBalanceChange from the outbox, register it, and apply it."""
    sent = rows(conn, "DELETE FROM pending_balance_change_signal RETURNING *")
    for signal in sent:
        register_change(
            conn,
            signal["debtor_id"],
            signal["creditor_id"],
            signal["principal_delta"],
            other_creditor_id=signal["other_creditor_id"],
            change_id=signal["change_id"],
            coordinator_type=signal["coordinator_type"],
            committed_at=signal["committed_at"],
            note_format=signal["transfer_note_format"],
            note=signal["transfer_note"],
        )
    for debtor_id, creditor_id in sorted({(s["debtor_id"], s["creditor_id"]) for s in sent}):
        process_changes(conn, debtor_id, creditor_id, now)
    return len(sent)
