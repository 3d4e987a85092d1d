"""The consumer serves a PrepareTransfer or FinalizeTransfer at once when the sender is free.

A real `pyswpt run consumer` alone, without the workers: what it does not serve
itself stays queued, so the tables show which way each request went.
"""

from __future__ import annotations

from collections.abc import Iterator

import pika
import pytest
from broker import declare_smp_exchanges
from drivers import wait_for
from libpq_trace import sent_queries, traced
from peers import Shard, open_shard
from psycopg.rows import dict_row
from test_parking import install_fault, parked

from pyswpt import db
from pyswpt.applying import REQUEUED, Applied, Item, WindowApplier, transactions_of
from pyswpt.consuming import Delivery
from pyswpt.drivers.consumer import MAX_REQUESTS_SERVED_PER_WINDOW, queue_requests_of_a_full_window
from pyswpt.sharding import u64_string
from pyswpt.transactions import SqlCall


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


@pytest.fixture
def shard(conn, database_url, rabbitmq_url, tmp_path) -> Iterator[Shard]:
    with open_shard(conn, database_url, rabbitmq_url, tmp_path, queue_prefix="pyswpt_test_at_once") as opened:
        yield opened
    conn.execute("DROP TRIGGER IF EXISTS test_fault ON prepared_transfer")
    conn.execute("DROP FUNCTION IF EXISTS public.test_fault() CASCADE")


def prepared(shard: Shard, sender: int) -> list[dict]:
    with shard.conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT * FROM prepared_transfer WHERE debtor_id = %s AND sender_creditor_id = %s"
            " ORDER BY coordinator_request_id",
            (shard.debtor_id, sender),
        ).fetchall()


def queued_requests(shard: Shard) -> int:
    return shard.queued_rows(("transfer_request", "finalization_request"))


def finalized(shard: Shard) -> int:
    return shard.count("SELECT count(*) FROM finalized_transfer_signal WHERE debtor_id = %s", shard.debtor_id)


def test_the_consumer_alone_prepares_and_finalizes_in_the_order_of_the_window(shard):
    sender, recipient = shard.creditor(), shard.creditor()
    # One window: the sender is configured by the messages before its PrepareTransfer.
    shard.configure(sender)
    shard.configure(recipient)
    shard.prepare(sender, u64_string(recipient), request_id=1, min_locked=0, max_locked=0)
    [consumer] = shard.start("consumer")
    wait_for(lambda: len(prepared(shard, sender)) == 1, "the transfer to be prepared")
    assert queued_requests(shard) == 0

    [transfer] = prepared(shard, sender)
    shard.finalize({**transfer, "creditor_id": sender}, 0)
    wait_for(lambda: finalized(shard) == 1, "the transfer to be finalized")
    assert prepared(shard, sender) == []
    assert queued_requests(shard) == 0
    consumer.assert_alive()


def test_a_refused_prepare_is_parked_and_its_neighbours_served_once(shard):
    sender, recipient, late = shard.creditor(), shard.creditor(), shard.creditor()
    shard.configure(sender)
    shard.configure(recipient)
    [consumer] = shard.start("consumer")
    wait_for(lambda: shard.account(recipient) is not None, "the accounts")
    install_fault(
        shard.conn,
        "prepared_transfer",
        "NEW.coordinator_request_id = 2",
        "RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation'",
    )
    consumer.stop()
    # No more requests than a window serves at once.
    for request_id in (1, 2):
        shard.prepare(sender, u64_string(recipient), request_id=request_id, min_locked=0, max_locked=0)
    shard.configure(late)

    [consumer] = shard.start("consumer")
    wait_for(lambda: shard.account(late) is not None, "the window to be applied")
    wait_for(lambda: len(parked(shard)) == 1, "the refused request to be parked")
    assert [t["coordinator_request_id"] for t in prepared(shard, sender)] == [1]
    assert shard.account(sender)["pending_transfers_count"] == 1
    [row] = parked(shard)
    assert (row["reason_code"], row["sqlstate"], row["message_type"]) == ("refused", "23514", "PrepareTransfer")
    assert queued_requests(shard) == 0
    assert shard.ready_messages() == 0


def test_a_window_is_cut_around_the_calls_that_are_transactions_of_their_own():
    def item(name: str, alone: bool = False) -> Item:
        return Item(delivery=None, what=name, alone=alone)

    window = [item("c1"), item("p1", True), item("p2", True), item("c2"), item("c3"), item("f1", True), item("c4")]
    assert [[i.what for i in t] for t in transactions_of(window)] == [
        ["c1"],
        ["p1"],
        ["p2"],
        ["c2", "c3"],
        ["f1"],
        ["c4"],
    ]
    assert transactions_of([]) == []


# The window's last transaction carries the durability barrier ------------------------------------

# Each call says which transaction ran it; a call alone, whether it carries the barrier.
TRANSACTION = "SELECT txid_current()"
TRANSACTION_ALONE = "SELECT txid_current(), %(make_durable)s::boolean"
TIMES_OUT = """
CREATE FUNCTION pg_temp.times_out(p_make_durable boolean) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'canceling statement due to statement timeout' USING ERRCODE = 'query_canceled';
END;
$$
"""


def window_item(tag: int, query: str = TRANSACTION_ALONE, *, alone: bool = True) -> Item:
    delivery = Delivery(tag, pika.BasicProperties(type="Test"), b"{}")
    return Item(delivery, f"message {tag}", call=SqlCall(query, {"make_durable": False} if alone else {}), alone=alone)


def barriers_sent(conn, window: list[Item]) -> tuple[list, list[bool]]:
    """The window's results, and for each statement sent whether it is the barrier."""
    with traced(conn) as lines:
        results = WindowApplier("test").apply(conn, window)
    sent = [statement for query in sent_queries(lines) for statement in query]
    return results, ["make_commits_durable" in statement for statement in sent]


def test_a_window_runs_in_order_and_its_last_call_alone_carries_the_barrier(database_url):
    window = [window_item(1), window_item(2, TRANSACTION, alone=False), window_item(3, TRANSACTION, alone=False)]
    window.append(window_item(4))
    with db.connect(database_url, asynchronous_commit=True) as conn:
        results, barriers = barriers_sent(conn, window)
    first, second, third, fourth = (result.row[0] for result in results)
    assert first < second == third < fourth
    assert [results[0].row[1], results[3].row[1]] == [False, True]
    assert not any(barriers)


def test_a_window_ending_in_its_common_transaction_sends_the_barrier_in_it(database_url):
    window = [window_item(1), window_item(2, TRANSACTION, alone=False)]
    with db.connect(database_url, asynchronous_commit=True) as conn:
        results, barriers = barriers_sent(conn, window)
    assert results[0].row[1] is False
    assert barriers == [False, False, True]


def test_a_window_whose_last_transaction_failed_runs_the_barrier_alone_before_its_acks(database_url):
    with db.connect(database_url, asynchronous_commit=True) as conn:
        conn.execute(TIMES_OUT)
        conn.commit()
        results, barriers = barriers_sent(
            conn, [window_item(1), window_item(2, "SELECT pg_temp.times_out(%(make_durable)s)")]
        )
    assert isinstance(results[0], Applied) and results[1] is REQUEUED
    assert barriers[-1] is True and sum(barriers) == 1


def test_a_window_of_more_requests_than_are_served_at_once_queues_them_in_its_transaction():
    def request(tag: int) -> Item:
        return Item(None, f"request {tag}", call=SqlCall("", {"serve_at_once": True}), alone=True)

    small = [request(tag) for tag in range(MAX_REQUESTS_SERVED_PER_WINDOW)]
    queue_requests_of_a_full_window(small)
    assert all(item.alone and item.call.params["serve_at_once"] for item in small)

    full = [*small, request(MAX_REQUESTS_SERVED_PER_WINDOW), Item(None, "a ConfigureAccount", call=SqlCall("", {}))]
    queue_requests_of_a_full_window(full)
    assert not any(item.alone for item in full)
    assert [item.call.params.get("serve_at_once") for item in full] == [False] * (len(full) - 1) + [None]
