"""Park, don't drop, don't loop (issue 8): what the consumers cannot apply is stored and set aside.

A real `pyswpt run consumer` against the real broker. Failures are provoked in
the database itself: a trigger installed by the test raises the SQLSTATE a
real fault would (a statement timeout, a refused row), so the consumer sees
exactly what the server would send.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from broker import declare_smp_exchanges
from drivers import wait_for
from peers import WAIT_SECONDS, Shard, open_shard, random_id
from psycopg.rows import dict_row

from pyswpt.applying import MAX_DELIVERY_ATTEMPTS


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


@pytest.fixture
def shard(conn, database_url, rabbitmq_url, tmp_path) -> Iterator[Shard]:
    with open_shard(conn, database_url, rabbitmq_url, tmp_path, queue_prefix="pyswpt_test_parking") as opened:
        yield opened
    for table in ("account", "registered_balance_change", "parked_message"):
        conn.execute(f"DROP TRIGGER IF EXISTS test_fault ON {table}")
    conn.execute("DROP FUNCTION IF EXISTS public.test_fault() CASCADE")


def install_fault(conn: psycopg.Connection, table: str, condition: str, raise_statement: str) -> None:
    """A trigger on `table` that runs `raise_statement` for the rows matching `condition`."""
    conn.execute(
        f"""
        CREATE FUNCTION public.test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {condition} THEN
                {raise_statement};
            END IF;
            RETURN NEW;
        END;
        $$
        """
    )
    conn.execute(
        f"CREATE TRIGGER test_fault BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION public.test_fault()"
    )


def parked(shard: Shard) -> list[dict]:
    with shard.conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute("SELECT * FROM parked_message ORDER BY parked_id").fetchall()


def lines_naming(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


# Third in its window: the ConfigureAccounts after it reach psycopg's sixth run of their query,
# which it prepares in the same pipeline, after the failure (pyswpt.transactions).
@pytest.mark.parametrize("poison_index", [10, 2])
def test_a_message_that_keeps_timing_out_is_parked_and_its_window_applied(shard, poison_index):
    creditors = [shard.creditor() for _ in range(20)]
    poison = creditors[poison_index]
    install_fault(
        shard.conn,
        "account",
        f"NEW.creditor_id = {poison}",
        "RAISE EXCEPTION 'canceling statement due to statement timeout' USING ERRCODE = 'query_canceled'",
    )
    for creditor in creditors:
        shard.configure(creditor)

    [consumer] = shard.start("consumer")
    wait_for(lambda: len(parked(shard)) >= 1, "the timing-out message to be parked", WAIT_SECONDS)
    wait_for(lambda: all(shard.account(c) is not None for c in creditors if c != poison), "the others applied")
    assert shard.account(poison) is None
    consumer.stop()
    assert shard.ready_messages() == 0

    [row] = parked(shard)
    assert row["reason_code"] == "repeated_failure"
    assert row["sqlstate"] == "57014"
    assert row["attempts"] >= MAX_DELIVERY_ATTEMPTS
    assert (row["debtor_id"], row["creditor_id"]) == (shard.debtor_id, poison)
    assert json.loads(row["body"])["creditor_id"] == poison
    [line] = lines_naming(consumer.log(), "while other messages passed")
    assert f"ConfigureAccount for account ({shard.debtor_id}, {poison})" in line
    assert "delivery tag" in line and "57014" in line


def test_a_refused_balance_change_is_parked_with_its_body_and_one_clean_log_line(shard):
    creditor, other = shard.creditor(), random_id()
    install_fault(
        shard.conn,
        "registered_balance_change",
        "NEW.change_id = 777",
        "RAISE EXCEPTION 'refused for the test' USING ERRCODE = 'check_violation', DETAIL = 'note: secret-note'",
    )
    refused = shard.balance_change(creditor, other, 777, 50)
    shard.balance_change(creditor, other, 778, 1)

    [consumer] = shard.start("consumer", APP_LOG_FORMAT="json")
    wait_for(lambda: len(parked(shard)) == 1, "the refused balance change to be parked", WAIT_SECONDS)
    wait_for(
        lambda: shard.count("SELECT count(*) FROM registered_balance_change WHERE change_id = 778") == 1,
        "the next balance change",
    )
    consumer.stop()
    assert shard.ready_messages() == 0

    [row] = parked(shard)
    assert row["message_type"] == "PendingBalanceChange"
    assert row["reason_code"] == "refused"
    assert row["sqlstate"] == "23514"
    assert json.loads(row["body"]) == {"type": "PendingBalanceChange", **refused}
    assert row["routing_key"] == shard.queue  # published straight into the queue by the test
    log = consumer.log()
    assert "secret-note" not in log
    [line] = lines_naming(log, "Rejected PendingBalanceChange")
    entry = json.loads(line)
    assert entry["levelname"] == "ERROR"
    assert (entry["debtor_id"], entry["creditor_id"]) == (shard.debtor_id, creditor)
    assert entry["sqlstate"] == "23514"
    assert entry["message_type"] == "PendingBalanceChange"
    assert isinstance(entry["delivery_tag"], int)
    assert "PendingBalanceChange for account" in entry["message"]


def test_a_missing_function_is_not_the_message_fault(shard, migrated_database_url):
    creditor = shard.creditor()
    shard.conn.execute("ALTER FUNCTION configure_account RENAME TO configure_account_during_upgrade")
    try:
        shard.configure(creditor)
        [consumer] = shard.start("consumer")
        wait_for(lambda: "The database is unavailable" in consumer.log(), "the consumer to meet the missing function")
    finally:
        shard.conn.execute("ALTER FUNCTION configure_account_during_upgrade RENAME TO configure_account")
    wait_for(lambda: shard.account(creditor) is not None, "the message to be applied once the function is back")
    consumer.assert_alive()
    assert parked(shard) == []
    assert "42883" in consumer.log()


def test_an_undecodable_message_is_parked_even_with_nul_in_its_type(shard):
    next_creditor = shard.creditor()
    body = b'{"type": "ConfigureAccount", \x00'
    shard.publish("Configure\x00Account\n", body=body)
    shard.configure(next_creditor)

    [consumer] = shard.start("consumer")
    wait_for(lambda: shard.account(next_creditor) is not None, "the next message")
    consumer.stop()
    [row] = parked(shard)
    assert row["reason_code"] == "invalid"
    assert bytes(row["body"]) == body
    assert row["message_type"] == "Configure\ufffdAccount\n"
    [line] = lines_naming(consumer.log(), "Unknown message type")
    assert "Configure" in line


def test_the_same_message_parked_twice_stays_one_row(shard):
    body = b"not json"
    shard.publish("ConfigureAccount", body=body)
    shard.publish("ConfigureAccount", body=body)
    marker = shard.creditor()
    shard.configure(marker)

    [consumer] = shard.start("consumer")
    wait_for(lambda: shard.account(marker) is not None, "the marker")
    consumer.stop()
    [row] = parked(shard)
    assert row["attempts"] == 2


def test_a_message_that_cannot_even_be_parked_is_rejected_and_the_queue_goes_on(shard):
    install_fault(
        shard.conn,
        "parked_message",
        "true",
        "RAISE EXCEPTION 'no room for the test' USING ERRCODE = 'check_violation'",
    )
    shard.publish("ConfigureAccount", body=b"not json")
    next_creditor = shard.creditor()
    shard.configure(next_creditor)

    [consumer] = shard.start("consumer")
    wait_for(lambda: shard.account(next_creditor) is not None, "the next message")
    consumer.stop()
    assert shard.ready_messages() == 0
    [line] = lines_naming(consumer.log(), "parking failed")
    assert "23514" in line and "does not contain a valid JSON" in line
