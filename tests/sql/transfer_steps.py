"""Steps shared by the two-phase transfer tests (spec 02 §2.4, §2.5).

Each step calls the public SQL functions the way the drivers will (intake,
then the batch processor of one sender), and reads outbox rows back, so a test
reads as: arrange accounts, act, look at the messages and the account.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from factories import DEFAULT_NOW, T0, insert_account
from psycopg.rows import dict_row

from pyswpt.sharding import Realm

DEBTOR_ID = -2
SENDER_ID = 1099511627778
RECIPIENT_ID = 1234
MAX_INT64 = 2**63 - 1
MAX_INT32 = 2**31 - 1
SECONDS_IN_DAY = 86_400
DAY = dt.timedelta(days=1)
# commit_period of the default PREPARED_TRANSFER_MAX_DELAY_DAYS = 90.
COMMIT_PERIOD_SECONDS = 90 * SECONDS_IN_DAY
# A request's own deadline far beyond the commit period.
LONG_COMMIT_DELAY_SECONDS = 1_000 * SECONDS_IN_DAY
# T∞ of spec 01 §0.2.
T_INFINITY = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
# A worker of a shard that owns every account: its recipients are credited without the broker.
WHOLE_REALM = Realm.from_binding_key("#")
# Long enough for any machine; a lock wait it cuts short fails the test (57014) instead of hanging it.
NO_WAIT_STATEMENT_TIMEOUT = "10s"

SIGNAL_ORDER = {
    "rejected_transfer_signal": "signal_id",
    "prepared_transfer_signal": "signal_id",
    "finalized_transfer_signal": "transfer_id",
    "account_transfer_signal": "debtor_id, creditor_id, transfer_number",
    "account_update_signal": "signal_id",
    "pending_balance_change_signal": "change_id",
}


def rows(conn: psycopg.Connection, query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(query, params).fetchall()


def value(conn: psycopg.Connection, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def signals(conn: psycopg.Connection, table: str) -> list[dict[str, Any]]:
    """The rows of one outbox table, in the order they were written."""
    return rows(conn, f"SELECT * FROM {table} ORDER BY {SIGNAL_ORDER[table]}")


def account(conn: psycopg.Connection, creditor_id: int, debtor_id: int = DEBTOR_ID) -> dict[str, Any]:
    found = rows(
        conn,
        "SELECT * FROM account WHERE debtor_id = %s AND creditor_id = %s",
        (debtor_id, creditor_id),
    )
    assert found, f"no account ({debtor_id}, {creditor_id})"
    return found[0]


def prepared_transfers(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM prepared_transfer ORDER BY debtor_id, sender_creditor_id, transfer_id")


def enqueue_prepare(
    conn: psycopg.Connection,
    *,
    min_locked: int = 0,
    max_locked: int = 0,
    sender: int = SENDER_ID,
    recipient: int | None = RECIPIENT_ID,
    debtor: int = DEBTOR_ID,
    coordinator_type: str = "direct",
    coordinator_id: int | None = None,
    request_id: int = 1,
    final_interest_rate_ts: dt.datetime = DEFAULT_NOW,
    max_commit_delay_seconds: int = LONG_COMMIT_DELAY_SECONDS,
    ts: dt.datetime = DEFAULT_NOW,
    reachable: bool | None = None,
    now: dt.datetime = DEFAULT_NOW,
    at_once_commit_period_seconds: int | None = None,
) -> bool:
    """PrepareTransfer intake; `reachable` None lets SQL decide (recipient in this shard). With
    `at_once_commit_period_seconds`, as the consumer calls it: served at once if the sender is free."""
    return value(
        conn,
        "SELECT enqueue_transfer_request(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            debtor,
            sender,
            coordinator_type,
            sender if coordinator_id is None else coordinator_id,
            request_id,
            min_locked,
            max_locked,
            recipient,
            final_interest_rate_ts,
            max_commit_delay_seconds,
            ts,
            reachable,
            now,
            at_once_commit_period_seconds,
        ),
    )


def process_prepares(
    conn: psycopg.Connection,
    *,
    sender: int = SENDER_ID,
    debtor: int = DEBTOR_ID,
    commit_period_seconds: int = COMMIT_PERIOD_SECONDS,
    now: dt.datetime = DEFAULT_NOW,
) -> int:
    return value(
        conn,
        "SELECT process_transfer_requests(%s, %s, %s, %s)",
        (debtor, sender, commit_period_seconds, now),
    )


def prepare(conn: psycopg.Connection, *, now: dt.datetime = DEFAULT_NOW, **request: Any) -> dict[str, Any] | None:
    """Intake and processing of one request: the PreparedTransfer row, or None if rejected."""
    commit_period_seconds = request.pop("commit_period_seconds", COMMIT_PERIOD_SECONDS)
    signal_count = len(signals(conn, "prepared_transfer_signal"))
    enqueue_prepare(conn, now=now, **request)
    process_prepares(
        conn,
        sender=request.get("sender", SENDER_ID),
        debtor=request.get("debtor", DEBTOR_ID),
        commit_period_seconds=commit_period_seconds,
        now=now,
    )
    prepared = signals(conn, "prepared_transfer_signal")
    return prepared[-1] if len(prepared) > signal_count else None


def enqueue_finalize(
    conn: psycopg.Connection,
    transfer: dict[str, Any],
    committed_amount: int,
    *,
    note_format: str = "",
    note: str = "",
    ts: dt.datetime = DEFAULT_NOW,
    now: dt.datetime = DEFAULT_NOW,
    finalized_at_once: bool = False,
    **mismatch: Any,
) -> bool:
    """FinalizeTransfer intake for a prepared transfer; `mismatch` overrides its coordinator fields.
    `finalized_at_once`: the transaction ends with finalize_at_once, as a consumer's does."""
    fields = {key: transfer[key] for key in ("coordinator_type", "coordinator_id", "coordinator_request_id")}
    fields.update(mismatch)
    return value(
        conn,
        "SELECT enqueue_finalization_request(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            transfer["debtor_id"],
            transfer["sender_creditor_id"],
            transfer["transfer_id"],
            fields["coordinator_type"],
            fields["coordinator_id"],
            fields["coordinator_request_id"],
            committed_amount,
            note_format,
            note,
            ts,
            now,
            finalized_at_once,
        ),
    )


def process_finalizations(
    conn: psycopg.Connection,
    *,
    sender: int = SENDER_ID,
    debtor: int = DEBTOR_ID,
    ignore_all: bool = False,
    now: dt.datetime = DEFAULT_NOW,
    realm: Realm | None = None,
) -> int:
    """The sender's finalization batch; with `realm`, as a worker of that shard runs it."""
    if realm is None:
        return value(conn, "SELECT process_finalization_requests(%s, %s, %s, %s)", (debtor, sender, ignore_all, now))
    return value(
        conn,
        "SELECT process_finalization_requests(%s, %s, %s, %s, p_realm_mask => %s, p_realm => %s)",
        (debtor, sender, ignore_all, now, realm.mask, realm.realm),
    )


def finalize(
    conn: psycopg.Connection,
    transfer: dict[str, Any],
    committed_amount: int,
    *,
    now: dt.datetime = DEFAULT_NOW,
    **options: Any,
) -> dict[str, Any] | None:
    """Intake and processing of one FinalizeTransfer: its FinalizedTransfer row, or None."""
    enqueue_finalize(conn, transfer, committed_amount, now=now, **options)
    process_finalizations(conn, sender=transfer["sender_creditor_id"], debtor=transfer["debtor_id"], now=now)
    found = [
        row
        for row in signals(conn, "finalized_transfer_signal")
        if (row["debtor_id"], row["sender_creditor_id"], row["transfer_id"])
        == (transfer["debtor_id"], transfer["sender_creditor_id"], transfer["transfer_id"])
    ]
    return found[0] if found else None


def deliver_balance_changes(conn: psycopg.Connection, *, now: dt.datetime = DEFAULT_NOW) -> None:
    """What flusher and consumer do with PendingBalanceChange rows: register, then apply them."""
    for debtor_id, creditor_id in register_balance_changes(conn):
        conn.execute("SELECT process_balance_changes(%s, %s, %s)", (debtor_id, creditor_id, now))


def register_balance_changes(conn: psycopg.Connection) -> list[tuple[int, int]]:
    """Register the changes of the PendingBalanceChange rows as the consumer would; the accounts they change."""
    changes = signals(conn, "pending_balance_change_signal")
    for change in changes:
        conn.execute(
            "SELECT register_balance_change(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                change["debtor_id"],
                change["other_creditor_id"],
                change["change_id"],
                change["creditor_id"],
                change["coordinator_type"],
                change["transfer_note_format"],
                change["transfer_note"],
                change["committed_at"],
                change["principal_delta"],
                T0,
            ),
        )
        conn.execute(
            "DELETE FROM pending_balance_change_signal"
            " WHERE debtor_id = %s AND other_creditor_id = %s AND change_id = %s",
            (change["debtor_id"], change["other_creditor_id"], change["change_id"]),
        )
    return sorted({(change["debtor_id"], change["creditor_id"]) for change in changes})


@contextlib.contextmanager
def held_by_another_transaction(conn: psycopg.Connection, database_url: str, creditor_id: int) -> Iterator[None]:
    """The account locked, as a worker locks it, by an open transaction of another session.

    Meanwhile a statement of `conn` that waits for the lock fails (57014) instead of waiting forever.
    """
    with psycopg.connect(database_url) as other:
        locked = other.execute(
            "SELECT 1 FROM pyswpt.account WHERE debtor_id = %s AND creditor_id = %s FOR NO KEY UPDATE",
            (DEBTOR_ID, creditor_id),
        ).fetchall()
        assert locked == [(1,)], "no such account to hold"
        conn.execute(f"SET statement_timeout = '{NO_WAIT_STATEMENT_TIMEOUT}'")
        try:
            yield
        finally:
            conn.execute("RESET statement_timeout")
            other.rollback()


@contextlib.contextmanager
def changed_after_the_snapshot(conn: psycopg.Connection, database_url: str, creditor_id: int) -> Iterator[None]:
    """A REPEATABLE READ transaction of `conn` (the drivers' level) whose snapshot is older than a
    change of the account by another session: locking the row in it fails with 40001."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT 1")  # the transaction's snapshot
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute(
                "UPDATE pyswpt.account SET last_heartbeat_ts = last_heartbeat_ts + interval '1 second'"
                " WHERE debtor_id = %s AND creditor_id = %s",
                (DEBTOR_ID, creditor_id),
            )
        yield


@pytest.fixture
def transfer_invariants_hold(conn: psycopg.Connection) -> Iterator[None]:
    """After the test, every account's lock columns and transfer numbers are consistent."""
    yield
    assert_lock_invariants(conn)
    assert_transfer_numbers_have_no_gaps(conn)


@pytest.fixture
def recipient(conn: psycopg.Connection) -> dict[str, Any]:
    return insert_account(conn, DEBTOR_ID, RECIPIENT_ID)


def assert_lock_invariants(conn: psycopg.Connection) -> None:
    """Spec 02 §5 invariant 2: every account's lock columns summarize its prepared transfers."""
    mismatches = rows(
        conn,
        """
        SELECT a.debtor_id, a.creditor_id, a.total_locked_amount, a.pending_transfers_count,
            coalesce(sum(pt.locked_amount), 0) AS locked_sum, count(pt.transfer_id) AS transfer_count
        FROM account AS a
        LEFT JOIN prepared_transfer AS pt
            ON pt.debtor_id = a.debtor_id AND pt.sender_creditor_id = a.creditor_id
        GROUP BY a.debtor_id, a.creditor_id
        HAVING a.total_locked_amount <> least(coalesce(sum(pt.locked_amount), 0), %s)
            OR a.pending_transfers_count <> count(pt.transfer_id)
        """,
        (MAX_INT64,),
    )
    assert mismatches == []


def assert_transfer_numbers_have_no_gaps(conn: psycopg.Connection) -> None:
    """Spec 02 §5 invariant 3: each account's AccountTransfers are numbered 1, 2, 3, ..."""
    for transfer in signals(conn, "account_transfer_signal"):
        assert transfer["previous_transfer_number"] == transfer["transfer_number"] - 1
    numbers = rows(
        conn,
        """
        SELECT debtor_id, creditor_id, array_agg(transfer_number ORDER BY transfer_number) AS numbers
        FROM account_transfer_signal
        GROUP BY debtor_id, creditor_id
        """,
    )
    for group in numbers:
        assert group["numbers"] == list(range(1, len(group["numbers"]) + 1))


def notifications_so_far(listener: psycopg.Connection, database_url: str, channel: str) -> list[str]:
    """The payloads `listener`, LISTENing on `channel`, got from the commits before now: a
    marker NOTIFY, committed now, comes after every one of them."""
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("SELECT pg_notify(%s, 'marker')", (channel,))
    payloads = []
    for notify in listener.notifies(timeout=10.0):
        if notify.payload == "marker":
            return payloads
        payloads.append(notify.payload)
    raise AssertionError(f"no marker NOTIFY within 10 s; got {payloads}")
