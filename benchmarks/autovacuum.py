"""Autovacuum, as a server with a given naptime runs it, for the benchmark's scenarios.

The CI machines here run PostgreSQL with autovacuum off, and the benchmark
must not turn a server setting on and off. Without vacuum, the outbox tables
keep every page their deleted rows filled, and a flusher's take scans them
all: over a 90 s window at C=100 its backend spent 0.21 ms per transfer, and
0.08 on a server whose autovacuum ran every 10 s. A node's server runs
autovacuum (the README recommends that naptime), so the benchmark can do what
it would: every naptime, VACUUM each table of the node whose dead rows pass
autovacuum's threshold (autovacuum_vacuum_threshold +
autovacuum_vacuum_scale_factor × rows, the table's own settings first, as
migration 0001 gives the queues and outboxes). Its session is named, so its
CPU is counted with the database's backends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import psycopg
from psycopg import sql

APPLICATION_NAME = "benchmark autovacuum"

# The node's tables past autovacuum's threshold for dead rows (PostgreSQL's rule,
# without the insert threshold, which the queues and outboxes turn off).
DUE_TABLES = """
    SELECT s.schemaname, s.relname
    FROM pg_stat_user_tables AS s
    JOIN pg_class AS c ON c.oid = s.relid
    CROSS JOIN LATERAL (
        SELECT
            max(o.option_value) FILTER (WHERE o.option_name = 'autovacuum_vacuum_threshold') AS threshold,
            max(o.option_value) FILTER (WHERE o.option_name = 'autovacuum_vacuum_scale_factor') AS scale_factor
        FROM pg_options_to_table(c.reloptions) AS o
    ) AS own
    WHERE s.schemaname = 'pyswpt'
        AND s.n_dead_tup > coalesce(own.threshold::integer, current_setting('autovacuum_vacuum_threshold')::integer)
            + coalesce(own.scale_factor::real, current_setting('autovacuum_vacuum_scale_factor')::real)
            * greatest(c.reltuples, 0)
    ORDER BY s.relname
"""


def vacuum_due_tables(conn: psycopg.Connection) -> list[str]:
    """One pass: VACUUM every table past its threshold; the tables vacuumed."""
    vacuumed = []
    for schema, table in conn.execute(DUE_TABLES).fetchall():
        conn.execute(sql.SQL("VACUUM {}").format(sql.Identifier(schema, table)))
        vacuumed.append(f"{schema}.{table}")
    return vacuumed


@contextlib.contextmanager
def running(database_url: str, naptime_seconds: float) -> Iterator[None]:
    """A pass every `naptime_seconds` in a thread of its own while the block runs; nothing for 0."""
    if naptime_seconds <= 0:
        yield
        return
    stopping = threading.Event()
    failures: list[BaseException] = []
    with psycopg.connect(database_url, autocommit=True, application_name=APPLICATION_NAME) as conn:

        def passes() -> None:
            try:
                while not stopping.wait(naptime_seconds):
                    vacuum_due_tables(conn)
            except BaseException as error:  # noqa: BLE001 - raised in the caller's thread below
                failures.append(error)

        thread = threading.Thread(target=passes, name="autovacuum")
        thread.start()
        try:
            yield
        finally:
            stopping.set()
            thread.join()
    if failures:  # figures measured without the vacuum they were to have are not that run's
        raise failures[0]
