"""The bounded reads behind the node's database metrics (sql/functions/96_metrics.sql)."""

from __future__ import annotations

import datetime as dt

from pyswpt import queries
from pyswpt.config import OUTBOX_TYPES


def queue_transfer_requests(conn, senders: list[int], enqueued_at: dt.datetime) -> None:
    for request_id, sender in enumerate(senders):
        conn.execute(
            "INSERT INTO transfer_request (debtor_id, sender_creditor_id, coordinator_type, coordinator_id,"
            " coordinator_request_id, min_locked_amount, max_locked_amount, deadline, recipient_creditor_id,"
            " final_interest_rate_ts, enqueued_at) VALUES (1, %s, 'direct', 1, %s, 0, 0, now(), 2, now(), %s)",
            (sender, request_id, enqueued_at),
        )


def work_queues(conn, max_rows: int) -> dict[str, tuple]:
    rows = conn.execute(queries.WORK_QUEUE_METRICS, {"max_rows": max_rows}).fetchall()
    return {stage: rest for stage, *rest in rows}


def test_figures_are_exact_below_the_limit(conn):
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    queue_transfer_requests(conn, [5, 5, 6], an_hour_ago)
    requests, accounts, age = work_queues(conn, 10)["transfer_requests"]
    assert (requests, accounts) == (3, 2)
    assert 3600 <= age < 3700
    assert work_queues(conn, 10)["finalization_requests"] == [0, 0, None]


def test_a_count_at_the_limit_reads_no_more_rows_and_is_never_below_them(conn):
    queue_transfer_requests(conn, [5, 6, 7, 8], dt.datetime.now(dt.UTC))
    requests, accounts, _age = work_queues(conn, 2)["transfer_requests"]
    # Only two rows were read; the count comes from the statistics, at least what was read.
    assert accounts == 2
    assert requests >= 2


def test_the_outbox_backlog_names_tables_as_the_flusher_commands_do(conn):
    rows = conn.execute(queries.OUTBOX_BACKLOG_METRICS, {"max_rows": 10}).fetchall()
    assert {table for table, _count, _age in rows} == set(OUTBOX_TYPES)
    assert {(count, age) for _table, count, age in rows} == {(0, None)}
