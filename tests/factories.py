"""Rows for arranging tests, with the spec's initial values (spec 02 §1.2).

Tests arrange state in SQL and act through the public functions; these
helpers write the complete rows so that a test names only what it is about.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
from drivers import wait_for
from psycopg import sql
from psycopg.rows import dict_row

# Re-exported: tests import the flag bits (spec 02 §1.11) with the other factories.
from pyswpt.flags import CONFIG_SCHEDULED_FOR_DELETION, STATUS_DELETED, STATUS_OVERFLOWN  # noqa: F401

UTC = dt.UTC
# T0, "never" (spec 01 §0.2).
T0 = dt.datetime(1970, 1, 1, tzinfo=UTC)
# The instant rows are created at unless a test passes its own `now`.
DEFAULT_NOW = dt.datetime(2024, 1, 15, 12, 0, tzinfo=UTC)
EPOCH_DATE = dt.date(1970, 1, 1)
TRANSFER_ID_DAY_SHIFT = 40
# Pending accounts to announce in one call: well past the rows a PL/pgSQL FOR loop
# fetches (and so locks) at once, ten, so that the last ones are locked later.
ACCOUNTS_IN_ONE_ANNOUNCEMENT = 50

T = TypeVar("T")


def initial_transfer_id(creation_date: dt.date) -> int:
    """`days(creation_date) << 40`: transfer ids never repeat across incarnations."""
    return (creation_date - EPOCH_DATE).days << TRANSFER_ID_DAY_SHIFT


def account_values(
    debtor_id: int, creditor_id: int, *, now: dt.datetime = DEFAULT_NOW, **overrides: Any
) -> dict[str, Any]:
    """Every column of a new account created at `now`, with `overrides` applied."""
    creation_date = overrides.get("creation_date", now.astimezone(UTC).date())
    values: dict[str, Any] = {
        "debtor_id": debtor_id,
        "creditor_id": creditor_id,
        "creation_date": creation_date,
        "last_change_seqnum": 0,
        "last_change_ts": now,
        "principal": 0,
        "interest_rate": 0.0,
        "interest": 0.0,
        "last_interest_rate_change_ts": T0,
        "last_config_ts": T0,
        "last_config_seqnum": 0,
        "last_transfer_number": 0,
        "last_transfer_committed_at": T0,
        "negligible_amount": 0.0,
        "config_flags": 0,
        "config_data": "",
        "debtor_info_iri": None,
        "debtor_info_content_type": None,
        "debtor_info_sha256": None,
        "status_flags": 0,
        "total_locked_amount": 0,
        "pending_transfers_count": 0,
        "last_transfer_id": initial_transfer_id(creation_date),
        "previous_interest_rate": 0.0,
        "last_heartbeat_ts": now,
        "last_interest_capitalization_ts": T0,
        "last_deletion_attempt_ts": T0,
        "pending_account_update": False,
    }
    unknown = set(overrides) - set(values)
    if unknown:
        raise TypeError(f"account has no column(s) {', '.join(sorted(unknown))}")
    values.update(overrides)
    return values


def insert_account(
    conn: psycopg.Connection,
    debtor_id: int,
    creditor_id: int,
    *,
    now: dt.datetime = DEFAULT_NOW,
    **overrides: Any,
) -> dict[str, Any]:
    """Insert a complete `pyswpt.account` row and return it as stored.

    Runs in the caller's transaction (no commit), so it works on the
    autocommit `conn` fixture and inside a test's own transaction alike.
    """
    values = account_values(debtor_id, creditor_id, now=now, **overrides)
    statement = sql.SQL("INSERT INTO pyswpt.account ({}) VALUES ({}) RETURNING *").format(
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(map(sql.Placeholder, values)),
    )
    with conn.cursor(row_factory=dict_row) as cursor:
        row = cursor.execute(statement, values).fetchone()
    assert row is not None
    return row


@contextlib.contextmanager
def failing_account_writes(conn: psycopg.Connection, creditor_id: int, statement: str) -> Iterator[Callable[[], None]]:
    """Until the block ends or the yielded function is called, every insert or update of
    an account of `creditor_id` runs the PL/pgSQL `statement` first (a RAISE, a long
    pg_sleep): that account's processing fails in the database itself, not in a mock.

    Arrange the account's rows before entering: the trigger refuses the test's inserts too.
    """

    def stop_failing() -> None:
        conn.execute("DROP TRIGGER IF EXISTS test_failing_account_write ON pyswpt.account")
        conn.execute("DROP FUNCTION IF EXISTS pyswpt.test_failing_account_write()")

    conn.execute(
        "CREATE FUNCTION pyswpt.test_failing_account_write() RETURNS trigger LANGUAGE plpgsql"
        f" AS $$ BEGIN {statement} RETURN NEW; END $$"
    )
    conn.execute(
        "CREATE TRIGGER test_failing_account_write BEFORE INSERT OR UPDATE ON pyswpt.account FOR EACH ROW"
        f" WHEN (NEW.creditor_id = {int(creditor_id)}) EXECUTE FUNCTION pyswpt.test_failing_account_write()"
    )
    try:
        yield stop_failing
    finally:
        stop_failing()


def announce_while_accounts_change(
    conn: psycopg.Connection, database_url: str, announcer_pid: int, announce: Callable[[], T], change: str
) -> T:
    """`announce()` (run on the connection of `announcer_pid`) as under load, where workers
    change accounts while it runs: it takes its snapshot, locks the first accounts and
    stalls on the AccountUpdate outbox, which this holds; then the `change` statement
    runs and commits, the outbox is let go, and announce() goes on. Returns its result.
    """
    # The holder closes first, so that a failing test never leaves announce() waiting for it.
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        contextlib.closing(psycopg.connect(database_url)) as outbox_holder,
    ):
        outbox_holder.execute("LOCK TABLE pyswpt.account_update_signal IN SHARE MODE")
        announced = pool.submit(announce)
        wait_for(
            lambda: (
                conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (announcer_pid,)).fetchone()
                == ("Lock",)
            ),
            "the announcement to wait for the outbox",
        )
        conn.execute(change)
        outbox_holder.rollback()
        return announced.result(timeout=30)
