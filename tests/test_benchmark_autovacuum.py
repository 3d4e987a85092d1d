"""The benchmark's autovacuum (benchmarks/autovacuum.py) vacuums what PostgreSQL's would, and only that."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import autovacuum  # noqa: E402

ROWS = 1000
DEADLINE_SECONDS = 30.0


@pytest.fixture
def tables(fresh_database_url: str) -> Iterator[psycopg.Connection]:
    """Two tables of the node's schema with dead rows: `outbox` past its own threshold (a
    table setting, as the migrations give the outboxes), `ledger` below the server's
    (50 + 20 % of its rows)."""
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA pyswpt")
        conn.execute(
            "CREATE TABLE pyswpt.outbox (id integer)"
            " WITH (autovacuum_vacuum_threshold = 10, autovacuum_vacuum_scale_factor = 0)"
        )
        conn.execute("CREATE TABLE pyswpt.ledger (id integer)")
        for table in (sql.Identifier("pyswpt", "outbox"), sql.Identifier("pyswpt", "ledger")):
            conn.execute(sql.SQL("INSERT INTO {} SELECT generate_series(1, %(rows)s)").format(table), {"rows": ROWS})
            conn.execute(sql.SQL("ANALYZE {}").format(table))
        conn.execute("DELETE FROM pyswpt.outbox WHERE id <= 100")
        conn.execute("DELETE FROM pyswpt.ledger WHERE id <= 100")
        conn.execute("SELECT pg_stat_force_next_flush()")
        yield conn


def dead_rows(conn: psycopg.Connection, table: str) -> int:
    return conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = %s", (table,)).fetchone()[0]


def vacuum_count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = %s", (table,)).fetchone()[0]


def test_a_pass_vacuums_the_tables_past_their_threshold_only(tables: psycopg.Connection) -> None:
    assert dead_rows(tables, "outbox") == 100 and dead_rows(tables, "ledger") == 100
    assert autovacuum.vacuum_due_tables(tables) == ["pyswpt.outbox"]
    assert vacuum_count(tables, "outbox") == 1 and vacuum_count(tables, "ledger") == 0
    assert autovacuum.vacuum_due_tables(tables) == []  # nothing is dead any more


def test_running_vacuums_every_naptime_while_the_block_runs(
    tables: psycopg.Connection, fresh_database_url: str
) -> None:
    with autovacuum.running(fresh_database_url, naptime_seconds=0.1):
        deadline = time.monotonic() + DEADLINE_SECONDS
        while vacuum_count(tables, "outbox") == 0:
            assert time.monotonic() < deadline, "no pass in time"
            time.sleep(0.05)
        tables.execute("DELETE FROM pyswpt.outbox WHERE id <= 200")
        tables.execute("SELECT pg_stat_force_next_flush()")
        while vacuum_count(tables, "outbox") < 2:
            assert time.monotonic() < deadline, "no second pass in time"
            time.sleep(0.05)
    assert vacuum_count(tables, "ledger") == 0


def test_no_naptime_runs_no_pass(tables: psycopg.Connection, fresh_database_url: str) -> None:
    with autovacuum.running(fresh_database_url, naptime_seconds=0):
        pass
    assert vacuum_count(tables, "outbox") == 0
