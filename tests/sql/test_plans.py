"""The per-account entry points reach their rows through an index whatever the statistics say.

PL/pgSQL keeps a generic plan for each statement for the rest of the session,
costed at the size the table had when the plan was made. A work queue analyzed
while nearly empty makes a whole-table scan the cheapest plan for a lookup by
key, and the session would go on scanning the whole table after it grew or
filled with dead rows (issue 10: 20 % fewer transfers per second after an
ANALYZE). So these entry points run with enable_seqscan = off.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from conftest import new_database
from factories import insert_account
from transfer_steps import (
    DEBTOR_ID,
    RECIPIENT_ID,
    SENDER_ID,
    deliver_balance_changes,
    finalize,
    prepare,
)

from pyswpt import schema

# Tables the transfer path reads by key. The outbox tables are left out: the
# test's own reads of them (transfer_steps) scan them, and the flusher takes any rows.
KEYED_TABLES = (
    "account",
    "transfer_request",
    "prepared_transfer",
    "finalization_request",
    "pending_balance_change",
    "registered_balance_change",
)

# More than the five custom plans PL/pgSQL makes before it settles on a generic one.
TRANSFERS = 8


@pytest.fixture
def analyzed_conn(postgres_server_url: str) -> Iterator[psycopg.Connection]:
    """A database of its own (ANALYZE changes plans for every later session), with two
    accounts, analyzed while its work queues are empty."""
    with new_database(postgres_server_url, "pyswpt_test_plans") as url:
        schema.apply_migrations(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
            insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1_000_000)
            insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
            conn.execute("ANALYZE")
            yield conn


def scans(conn: psycopg.Connection) -> dict[str, tuple[int, int]]:
    """(sequential scans, index scans) of each keyed table, with this session's counts flushed."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    found = conn.execute(
        "SELECT relname, seq_scan, idx_scan FROM pg_stat_user_tables"
        " WHERE schemaname = 'pyswpt' AND relname = ANY (%s)",
        (list(KEYED_TABLES),),
    ).fetchall()
    return {name: (seq, idx or 0) for name, seq, idx in found}


def test_transfers_after_analyze_of_empty_queues_scan_no_table(analyzed_conn: psycopg.Connection) -> None:
    before = scans(analyzed_conn)
    for request_id in range(1, TRANSFERS + 1):
        prepared = prepare(analyzed_conn, min_locked=10, max_locked=10, request_id=request_id)
        assert prepared is not None
        assert finalize(analyzed_conn, prepared, 10) is not None
        deliver_balance_changes(analyzed_conn)
    after = scans(analyzed_conn)

    sequential = {name: after[name][0] - before[name][0] for name in KEYED_TABLES}
    by_index = {name: after[name][1] - before[name][1] for name in KEYED_TABLES}
    assert sequential == dict.fromkeys(KEYED_TABLES, 0)
    assert all(count >= TRANSFERS for count in by_index.values()), by_index


# The outbox tables a committed transfer fills, and the flusher's take of each.
TAKES = {
    "prepared_transfer_signal": "take_prepared_transfer_signals",
    "finalized_transfer_signal": "take_finalized_transfer_signals",
    "account_transfer_signal": "take_account_transfer_signals",
}


def nested_plans(conn: psycopg.Connection) -> list[str]:
    """From now on, the plan of every statement the session runs, functions' statements
    included, as auto_explain logs them; JIT on, as PostgreSQL ships it."""
    plans: list[str] = []
    conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for setting in ("auto_explain.log_min_duration = 0", "auto_explain.log_nested_statements = on"):
        conn.execute(f"SET {setting}")
    conn.execute("SET client_min_messages = log")
    conn.execute("SET jit = on")
    return plans


def test_a_take_scans_its_outbox_table_once_and_deletes_by_tid_uncompiled(analyzed_conn: psycopg.Connection) -> None:
    # Until vacuum comes, a scan of an outbox table reads every page its deleted rows
    # filled: the take must not scan it a second time to delete what it found, and the
    # plan PL/pgSQL keeps from a first call on a small table must not either.
    for request_id in range(1, TRANSFERS + 1):
        prepared = prepare(analyzed_conn, min_locked=10, max_locked=10, request_id=request_id)
        assert finalize(analyzed_conn, prepared, 10) is not None
    plans = nested_plans(analyzed_conn)
    for table, take in TAKES.items():
        with analyzed_conn.transaction():
            taken = analyzed_conn.execute(f"SELECT count(*) FROM pyswpt_api.{take}(1000)").fetchone()[0]
        assert taken >= TRANSFERS, table
    for table in TAKES:
        [plan] = [plan for plan in plans if f"DELETE FROM {table}" in plan]
        assert plan.count(f"Seq Scan on {table}") == 1, plan
        assert f"Tid Scan on {table}" in plan, plan
        # A disabled path's cost is past jit_above_cost: a compiled take cost 90 ms.
        assert "JIT" not in plan, plan


# The work queues a transfer passes through, each emptied by its stage's take.
REQUEST_QUEUES = ("transfer_request", "finalization_request")


def test_a_stage_finds_the_requests_it_takes_once_and_deletes_them_by_tid(analyzed_conn: psycopg.Connection) -> None:
    # One statement locks a sender's queued requests by key and deletes them by
    # ctid; a DELETE by key after the lookup walked the index a second time.
    plans = nested_plans(analyzed_conn)
    for request_id in range(1, TRANSFERS + 1):
        prepared = prepare(analyzed_conn, min_locked=10, max_locked=10, request_id=request_id)
        assert finalize(analyzed_conn, prepared, 10) is not None
    for table in REQUEST_QUEUES:
        deletes = [plan for plan in plans if f"DELETE FROM {table}" in plan]
        assert len(deletes) >= TRANSFERS, table
        for plan in deletes:
            assert plan.count(f"Index Scan using {table}_pkey on {table}") == 1, plan
            assert f"Tid Scan on {table}" in plan, plan


def test_no_statement_of_a_transfer_is_compiled(analyzed_conn: psycopg.Connection) -> None:
    # The entry points run with enable_seqscan = off: a statement whose plan kept a
    # sequential scan would carry its penalty past jit_above_cost and be compiled at
    # every run (90 ms each for the outbox takes, before their jit = off).
    plans = nested_plans(analyzed_conn)
    for request_id in range(1, TRANSFERS + 1):
        prepared = prepare(analyzed_conn, min_locked=10, max_locked=10, request_id=request_id)
        assert finalize(analyzed_conn, prepared, 10) is not None
        deliver_balance_changes(analyzed_conn)
    for take in TAKES.values():
        analyzed_conn.execute(f"SELECT count(*) FROM pyswpt_api.{take}(1000)")
    assert len(plans) > 100
    assert [plan for plan in plans if "JIT" in plan] == []


def test_an_account_row_is_locked_as_one_whole_row_value(analyzed_conn: psycopg.Connection) -> None:
    # PostgreSQL builds every plan node's row type at each execution, one entry per
    # column, and PL/pgSQL assigns a row's columns to a variable one by one: an
    # account's 28 columns through a lock cost 4 % of a transfer's instructions.
    plans = nested_plans(analyzed_conn)
    analyzed_conn.execute("SET auto_explain.log_verbose = on")
    for request_id in range(1, TRANSFERS + 1):
        prepared = prepare(analyzed_conn, min_locked=10, max_locked=10, request_id=request_id)
        assert finalize(analyzed_conn, prepared, 10) is not None
        deliver_balance_changes(analyzed_conn)
    # The foreign keys' checks lock account rows too (FOR KEY SHARE), by PostgreSQL's own query.
    locks = [plan for plan in plans if "FOR NO KEY UPDATE" in plan and "on pyswpt.account " in plan]
    assert len(locks) >= 3 * TRANSFERS  # the sender's twice, the recipient's once
    for plan in locks:
        outputs = [line.strip().removeprefix("Output: ") for line in plan.splitlines() if "Output:" in line]
        # The whole row and the row's ctid, which the lock needs: no column list.
        assert all(len(output.split(", ")) <= 2 for output in outputs), plan
        assert "locked.*, locked.ctid" in outputs, plan
