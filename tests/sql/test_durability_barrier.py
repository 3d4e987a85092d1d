"""pyswpt_api.make_commits_durable: the flusher's barrier before it publishes what asynchronous commits wrote,
and pyswpt_api.current_wal_position, the position it is given."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
import yoyo

from pyswpt import schema

NOW = dt.datetime(2024, 5, 20, 10, 15, 30, tzinfo=dt.UTC)


def create_account(conn, creditor_id: int, synchronous: bool) -> str:
    """An account made in a transaction of its own (committed as a worker commits unless `synchronous`);
    the WAL position after its commit."""
    with conn.transaction():
        if not synchronous:
            conn.execute("SET LOCAL synchronous_commit = off")
        conn.execute("SELECT lock_or_create_account(-2, %s, %s)", (creditor_id, NOW))
    return conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]


def barrier(conn, through: str | None) -> bool:
    return conn.execute("SELECT pyswpt_api.make_commits_durable(%s::pg_lsn)", (through,)).fetchone()[0]


def snapshot_position(conn) -> str:
    """current_wal_position() as the flusher reads it: first in a REPEATABLE READ transaction."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return conn.execute("SELECT pyswpt_api.current_wal_position()").fetchone()[0]


def just_past(conn, position: str) -> str:
    """A position the WAL cannot have been flushed through yet: it lies past the end of the WAL."""
    return conn.execute("SELECT %s::pg_lsn + 1", (position,)).fetchone()[0]


def test_the_barrier_flushes_every_commit_before_it(conn, flushed_wal_records):
    committed_up_to = create_account(conn, 7, synchronous=False)

    assert barrier(conn, just_past(conn, committed_up_to)) is True

    # The barrier's record and its commit are on disk, so everything before
    # them is: whether or not the WAL writer flushed meanwhile, the barrier did.
    records = flushed_wal_records(committed_up_to)
    kinds = [record[:2] for record in records]
    at = kinds.index(("LogicalMessage", "MESSAGE"))
    assert 'prefix "pyswpt"' in records[at][2]
    assert ("Transaction", "COMMIT") in kinds[at + 1 :]


def test_the_barrier_is_a_transaction_that_writes_wal(conn):
    with conn.transaction():
        before = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        barrier(conn, just_past(conn, before))
        xid, wrote_wal = conn.execute(
            "SELECT pg_current_xact_id_if_assigned(), pg_current_wal_insert_lsn() > %s::pg_lsn", (before,)
        ).fetchone()
    # Only a commit with a transaction id that wrote WAL waits for the flush (synchronous_commit on).
    assert xid is not None
    assert wrote_wal


def test_the_barrier_writes_nothing_when_the_wal_is_flushed_through_its_position(conn):
    position = snapshot_position(conn)
    # A synchronous commit flushes the WAL through its own commit record, past the position.
    create_account(conn, 8, synchronous=True)

    with conn.transaction():
        waited = barrier(conn, position)
        xid = conn.execute("SELECT pg_current_xact_id_if_assigned()").fetchone()[0]

    assert waited is False
    assert xid is None


def test_without_a_position_the_barrier_always_waits(conn):
    create_account(conn, 9, synchronous=True)  # everything is flushed

    assert barrier(conn, None) is True


def test_the_position_lies_past_every_commit_the_snapshot_sees(conn, database_url):
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
        committed_up_to = create_account(other, 10, synchronous=False)
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            position = conn.execute("SELECT pyswpt_api.current_wal_position()").fetchone()[0]
            # Committed after the snapshot: the transaction does not see it.
            create_account(other, 11, synchronous=False)
            seen = conn.execute("SELECT creditor_id FROM account WHERE debtor_id = -2").fetchall()
        covered = conn.execute("SELECT %s::pg_lsn >= %s::pg_lsn", (position, committed_up_to)).fetchone()[0]
    assert seen == [(10,)]
    assert covered


@pytest.mark.parametrize(
    "set_level", ["SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"]
)
def test_the_position_is_given_where_one_snapshot_serves_the_transaction(conn, set_level):
    with conn.transaction():
        conn.execute(set_level)
        assert conn.execute("SELECT pyswpt_api.current_wal_position()").fetchone()[0] is not None


def test_no_position_at_read_committed_where_each_statement_sees_newer_commits(conn):
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        assert conn.execute("SELECT pyswpt_api.current_wal_position()").fetchone()[0] is None


@pytest.mark.parametrize(
    ("setting", "flushed"),
    [("on", True), ("remote_apply", True), ("local", True), ("remote_write", True), ("off", False)],
)
def test_an_outbox_row_records_whether_its_commit_is_flushed_before_it_is_visible(conn, setting, flushed):
    # Without a synchronous standby (the test server has none) every setting but off flushes before the commit shows.
    with conn.transaction():
        conn.execute("SELECT set_config('synchronous_commit', %s, TRUE)", (setting,))
        conn.execute("SELECT lock_or_create_account(-2, 9, %s)", (NOW,))

    row = conn.execute("SELECT flushed_at_commit FROM account_update_signal WHERE creditor_id = 9").fetchone()
    assert row[0] is flushed


def test_rows_queued_before_the_migration_that_added_the_column_count_as_not_flushed(fresh_database_url):
    # A worker may have written them, committing asynchronously: the barrier must still run for them.
    backend = yoyo.get_backend(schema.yoyo_url(fresh_database_url))
    migrations = yoyo.read_migrations(str(schema.MIGRATIONS_DIR))
    with backend.lock():
        backend.apply_migrations(backend.to_apply(migrations.filter(lambda m: m.id < "0016")))
    insert = (
        "INSERT INTO pyswpt.account_purge_signal (debtor_id, creditor_id, creation_date, inserted_at)"
        " VALUES (-2, %s, '2024-05-20', %s)"
    )
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(insert, (1, NOW))
        with backend.lock():
            backend.apply_migrations(backend.to_apply(migrations))
        conn.execute(insert, (2, NOW))
        rows = conn.execute(
            "SELECT creditor_id, flushed_at_commit FROM pyswpt.account_purge_signal ORDER BY creditor_id"
        ).fetchall()

    assert rows == [(1, False), (2, True)]
