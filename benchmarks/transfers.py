"""Throughput of two-phase transfers through the SQL functions (run on demand, not a test).

One "pair" is what the drivers do for one payment, each step its own
transaction on a driver's connection (pyswpt.db, REPEATABLE READ), retried on
40001/40P01 like the drivers:

    1. PrepareTransfer intake           enqueue_transfer_request (recipient checked in SQL),
                                        which prepares at once when the sender is free
    2. transfer worker                  process_transfer_requests (sender), only if the
                                        intake queued a request
    3. flusher + coordinator            the PreparedTransfer row gives the transfer id
    4. FinalizeTransfer intake          enqueue_finalization_request, then the window's
                                        last call, finalize_at_once, which finalizes when
                                        the sender is free, as step 5 would
    5. finalization worker              process_finalization_requests (sender), only if
                                        step 4 left the requests queued; it credits the
                                        recipient at once (a batch of one) or queues its
                                        balance change (one shard)
    6. balance-change worker            process_balance_changes (recipient), the queued
                                        changes (none after a credit at once) — unless
                                        --no-credit, and when that function is installed

Scenarios: "hot" — every sender pays one merchant (the merchant's row is the
contended one in step 6); "spread" — every pair has its own sender and recipient.
Each runs on 1 and on 4 connections (threads); the senders of different
connections never overlap.

Besides pairs per second, each run reports the CPU its connections' backends
spent per pair, read from /proc (benchmarks/cpu.py) when the server runs on
this machine: the SQL functions' own cost, which a shared machine's noise
changes much less than the throughput ("–" for a server elsewhere).

Usage:
    .venv/bin/python benchmarks/transfers.py [--postgres-url URL] [--pairs 2000] [--no-credit]
        [--synchronous-commit on|off]

The script creates a throwaway database on the server (dropped at the end).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import os
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cpu  # noqa: E402

from pyswpt import db, schema  # noqa: E402

T = TypeVar("T")

DEFAULT_URL = os.environ.get(
    "PYSWPT_BENCH_POSTGRES_URL",
    os.environ.get("PYSWPT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
DEBTOR_ID = 666
MERCHANT_ID = 1
FIRST_SENDER_ID = 1_000_000
FIRST_SPREAD_RECIPIENT_ID = 5_000_000
SENDER_PRINCIPAL = 10**12
AMOUNT = 10
COMMIT_PERIOD_SECONDS = 90 * 86400
MAX_COMMIT_DELAY_SECONDS = 7 * 86400
MAX_RETRIES = 8
CONNECTION_COUNTS = (1, 4)
# Payments per sender per round: 1 = one message per transaction; 10 = the
# consumer's batching and the workers' per-account batches at work.
BATCH_SIZES = (1, 10)
# Senders each connection cycles through (distinct per connection).
SENDERS_PER_CONNECTION = 50


@dataclasses.dataclass
class Result:
    scenario: str
    connections: int
    batch: int
    pairs: int
    seconds: float
    retries: int
    backend_cpu_seconds: float | None  # None when the server's processes are not on this machine

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds

    @property
    def backend_cpu_ms_per_pair(self) -> str:
        if self.backend_cpu_seconds is None:
            return "–"
        return f"{1000 * self.backend_cpu_seconds / self.pairs:.3f}"


def with_retries(conn: psycopg.Connection, operation: Callable[[psycopg.Connection], T]) -> tuple[T, int]:
    """Run one transaction, re-running it on serialization failure or deadlock."""
    for attempt in range(MAX_RETRIES + 1):
        try:
            result = operation(conn)
            conn.commit()
            return result, attempt
        except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected):
            conn.rollback()
    raise RuntimeError(f"gave up after {MAX_RETRIES} retries")


def connect(url: str, synchronous_commit: str) -> psycopg.Connection:
    """A driver's connection (pyswpt.db: REPEATABLE READ, the drivers' timeouts)."""
    conn = db.connect(url, application_name="pyswpt benchmark")
    conn.execute("SELECT set_config('synchronous_commit', %s, false)", (synchronous_commit,))
    conn.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
    conn.commit()
    return conn


def has_balance_change_functions(url: str) -> bool:
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pyswpt_api'::regnamespace"
            " AND proname = 'process_balance_changes'"
        ).fetchone()[0]
    return found == 1


def create_accounts(url: str, creditor_ids: list[int], principal: int, now: dt.datetime) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
        conn.execute(
            """
            INSERT INTO account
            SELECT (new_account(%s, c, %s)).*
            FROM unnest(%s::bigint[]) AS c
            ON CONFLICT DO NOTHING
            """,
            (DEBTOR_ID, now, creditor_ids),
        )
        conn.execute(
            "UPDATE account SET principal = %s WHERE debtor_id = %s AND creditor_id = ANY(%s)",
            (principal, DEBTOR_ID, creditor_ids),
        )


def set_up(url: str, connections: int) -> bool:
    """Install the schema and create the accounts that `connections` connections pay from and to.
    Returns whether the SQL API has the credit step (step 6)."""
    schema.apply_migrations(url)
    now = dt.datetime.now(dt.UTC)
    senders = [FIRST_SENDER_ID + n for n in range(connections * SENDERS_PER_CONNECTION)]
    create_accounts(url, senders, SENDER_PRINCIPAL, now)
    create_accounts(url, [MERCHANT_ID] + [FIRST_SPREAD_RECIPIENT_ID + s for s in senders], 0, now)
    return has_balance_change_functions(url)


def empty_queues_and_outbox(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname = 'pyswpt' AND tablename <> 'account'"
        ).fetchall()
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(sql.SQL(name) for (name,) in tables)))
        conn.execute("VACUUM ANALYZE")


def one_round(
    conn: psycopg.Connection, sender_id: int, recipient_id: int, first_request_id: int, batch: int, credit: bool
) -> int:
    """`batch` payments of one sender, each step one transaction for the whole batch
    (as the consumer applies a prefetch window and a worker serves a whole queue).
    Returns the number of retried transactions."""
    now = dt.datetime.now(dt.UTC)
    request_ids = list(range(first_request_id, first_request_id + batch))

    def intake(c: psycopg.Connection) -> bool:
        """Whether a request was queued for the transfer worker."""
        queued = False
        for request_id in request_ids:
            (was_queued,) = c.execute(
                "SELECT enqueue_transfer_request(%s, %s, 'direct', %s, %s, %s, %s, %s, %s, %s, %s, NULL, %s, %s)",
                (
                    DEBTOR_ID,
                    sender_id,
                    sender_id,
                    request_id,
                    AMOUNT,
                    AMOUNT,
                    recipient_id,
                    now,
                    MAX_COMMIT_DELAY_SECONDS,
                    now,
                    now,
                    COMMIT_PERIOD_SECONDS,
                ),
            ).fetchone()
            queued = queued or was_queued
        return queued

    def prepare(c: psycopg.Connection) -> None:
        c.execute(
            "SELECT process_transfer_requests(%s, %s, %s, %s)",
            (DEBTOR_ID, sender_id, COMMIT_PERIOD_SECONDS, now),
        )

    def take_prepared(c: psycopg.Connection) -> list[tuple[Any, ...]]:
        # The flusher's part: PreparedTransfer messages leave the outbox.
        prepared = c.execute(
            """
            DELETE FROM prepared_transfer_signal
            WHERE debtor_id = %s AND sender_creditor_id = %s AND coordinator_request_id = ANY(%s)
            RETURNING transfer_id, coordinator_type, coordinator_id, coordinator_request_id
            """,
            (DEBTOR_ID, sender_id, request_ids),
        ).fetchall()
        assert len(prepared) == batch, "a request was not prepared"
        return prepared

    def finalize_intake(c: psycopg.Connection, prepared: list[tuple[Any, ...]]) -> bool:
        """The intakes and the window's last call; whether requests were left for the worker."""
        for transfer_id, coordinator_type, coordinator_id, coordinator_request_id in prepared:
            c.execute(
                "SELECT enqueue_finalization_request(%s, %s, %s, %s, %s, %s, %s, '', '', %s, %s, true)",
                (
                    DEBTOR_ID,
                    sender_id,
                    transfer_id,
                    coordinator_type,
                    coordinator_id,
                    coordinator_request_id,
                    AMOUNT,
                    now,
                    now,
                ),
            )
        # The realm of a single shard (SHARDING_REALM's default), as the consumer gives it.
        (served,) = c.execute(
            "SELECT finalize_at_once(%s, %s, p_realm_mask => 0, p_realm => 0, p_now => %s)",
            ([DEBTOR_ID], [sender_id], now),
        ).fetchone()
        return served == 0

    def finalize(c: psycopg.Connection) -> None:
        # The realm of a single shard (SHARDING_REALM's default), as the workers give it: this
        # transaction credits the recipient (a batch of one, the recipient free) or queues its change.
        c.execute(
            "SELECT process_finalization_requests(%s, %s, false, %s, p_realm_mask => 0, p_realm => 0)",
            (DEBTOR_ID, sender_id, now),
        )

    def apply_credit(c: psycopg.Connection) -> None:
        c.execute("SELECT process_balance_changes(%s, %s, %s)", (DEBTOR_ID, recipient_id, now))

    queued, retries = with_retries(conn, intake)
    if queued:
        retries += with_retries(conn, prepare)[1]
    prepared, retried = with_retries(conn, take_prepared)
    retries += retried
    left, retried = with_retries(conn, lambda c: finalize_intake(c, prepared))
    retries += retried
    if left:
        retries += with_retries(conn, finalize)[1]
    if credit:
        retries += with_retries(conn, apply_credit)[1]
    return retries


def backend_cpu_seconds(conn: psycopg.Connection) -> float | None:
    """CPU time of the connection's backend so far; None if it is not a process of this machine."""
    stat = cpu.read_stat(conn.info.backend_pid)
    return None if stat is None or stat.command != "postgres" else stat.cpu_seconds


def run_connection(
    url: str, scenario: str, index: int, pairs: int, batch: int, credit: bool, synchronous_commit: str
) -> tuple[int, float | None]:
    """Retried transactions, and the backend's CPU seconds for the pairs (None: not measurable here)."""
    conn = connect(url, synchronous_commit)
    try:
        cpu_at_start = backend_cpu_seconds(conn)
        retries = run_pairs(conn, scenario, index, pairs, batch, credit)
        cpu_at_end = backend_cpu_seconds(conn)
    finally:
        conn.close()
    if cpu_at_start is None or cpu_at_end is None:
        return retries, None
    return retries, cpu_at_end - cpu_at_start


def run_pairs(
    conn: psycopg.Connection, scenario: str, index: int, pairs: int, batch: int, credit: bool, first_round: int = 0
) -> int:
    """`pairs` pairs of the `index`-th connection's senders, `batch` at a time; the retried transactions.
    Runs from `first_round` on, so that another call on the same database makes new request ids."""
    first_sender = FIRST_SENDER_ID + index * SENDERS_PER_CONNECTION
    retries = 0
    for round_number in range(first_round, first_round + pairs // batch):
        sender_id = first_sender + round_number % SENDERS_PER_CONNECTION
        recipient_id = MERCHANT_ID if scenario == "hot" else FIRST_SPREAD_RECIPIENT_ID + sender_id
        first_request_id = index * 10**9 + round_number * batch
        retries += one_round(conn, sender_id, recipient_id, first_request_id, batch, credit)
    return retries


def run(
    url: str, scenario: str, connections: int, batch: int, pairs: int, credit: bool, synchronous_commit: str
) -> Result:
    empty_queues_and_outbox(url)
    per_connection = pairs // connections // batch * batch
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=connections) as pool:
        futures = [
            pool.submit(run_connection, url, scenario, index, per_connection, batch, credit, synchronous_commit)
            for index in range(connections)
        ]
        outcomes = [future.result() for future in futures]
    seconds = time.perf_counter() - started
    retries = sum(retried for retried, _ in outcomes)
    backend_seconds = [cpu_seconds for _, cpu_seconds in outcomes]
    backend_cpu = None if None in backend_seconds else sum(backend_seconds)
    return Result(scenario, connections, batch, per_connection * connections, seconds, retries, backend_cpu)


def check_ledger(url: str) -> None:
    """After all runs: every lock released and nothing left queued."""
    with psycopg.connect(url) as conn:
        locked, pending = conn.execute(
            "SELECT sum(total_locked_amount), sum(pending_transfers_count) FROM pyswpt.account"
        ).fetchone()
        queued = conn.execute(
            "SELECT (SELECT count(*) FROM pyswpt.transfer_request) + (SELECT count(*) FROM pyswpt.finalization_request)"
        ).fetchone()[0]
    assert (locked, pending, queued) == (0, 0, 0), (locked, pending, queued)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres-url", default=DEFAULT_URL, help="server on which a scratch database is created")
    parser.add_argument("--pairs", type=int, default=2000, help="prepare+finalize pairs per run")
    parser.add_argument("--no-credit", action="store_true", help="leave out step 6 (crediting the recipient)")
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="on",
        help="off measures the SQL work without the WAL flush of every commit",
    )
    args = parser.parse_args()

    dbname = f"pyswpt_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.postgres_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    # A URL, not a key=value conninfo: yoyo needs one.
    url = urllib.parse.urlunsplit(urllib.parse.urlsplit(args.postgres_url)._replace(path="/" + dbname))
    try:
        credit = set_up(url, max(CONNECTION_COUNTS)) and not args.no_credit
        results = [
            run(url, scenario, connections, batch, args.pairs, credit, args.synchronous_commit)
            for batch in BATCH_SIZES
            for scenario in ("hot", "spread")
            for connections in CONNECTION_COUNTS
        ]
        check_ledger(url)
    finally:
        with psycopg.connect(args.postgres_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))

    steps = "prepare + finalize + credit" if credit else "prepare + finalize"
    print(
        f"two-phase transfers ({steps}), about {args.pairs} pairs per run, synchronous_commit={args.synchronous_commit}"
    )
    print(
        f"{'scenario':<8} {'conns':>5} {'batch':>5} {'pairs':>6} {'seconds':>8} {'pairs/s':>8} {'retries':>8}"
        f" {'PG CPU ms/pair':>14}"
    )
    for r in results:
        print(
            f"{r.scenario:<8} {r.connections:>5} {r.batch:>5} {r.pairs:>6} {r.seconds:>8.2f}"
            f" {r.pairs_per_second:>8.0f} {r.retries:>8} {r.backend_cpu_ms_per_pair:>14}"
        )


if __name__ == "__main__":
    main()
