"""pyswpt_api.make_commits_durable: the flusher's barrier before it publishes what asynchronous commits wrote."""

from __future__ import annotations

import datetime as dt

NOW = dt.datetime(2024, 5, 20, 10, 15, 30, tzinfo=dt.UTC)


def commit_asynchronously(conn) -> str:
    """An account made in a transaction with synchronous_commit off, as a worker commits; the WAL position after it."""
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = off")
        conn.execute("SELECT lock_or_create_account(-2, 7, %s)", (NOW,))
    return conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]


def test_the_barrier_flushes_every_commit_before_it(conn, flushed_wal_records):
    committed_up_to = commit_asynchronously(conn)

    conn.execute("SELECT pyswpt_api.make_commits_durable()")

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
        conn.execute("SELECT pyswpt_api.make_commits_durable()")
        xid, wrote_wal = conn.execute(
            "SELECT pg_current_xact_id_if_assigned(), pg_current_wal_insert_lsn() > %s::pg_lsn", (before,)
        ).fetchone()
    # Only a commit with a transaction id that wrote WAL waits for the flush (synchronous_commit on).
    assert xid is not None
    assert wrote_wal
