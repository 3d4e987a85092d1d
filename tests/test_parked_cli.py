"""`pyswpt parked list | show | replay | discard`, run as the operator runs it."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import psycopg
import pytest
from broker import catching_queue, declare_smp_exchanges
from drivers import driver_environment, pyswpt_command

from pyswpt import parking, sharding, topology

QUEUE = "swpt_accounts"
DEBTOR = -2
CREDITOR = 1099511627778
BALANCE_CHANGE_KEY = sharding.binary_routing_key(DEBTOR, CREDITOR)
BALANCE_CHANGE_BODY = (
    b'{"type":"PendingBalanceChange","debtor_id":-2,"creditor_id":1099511627778,"change_id":7,'
    b'"coordinator_type":"direct","transfer_note_format":"","transfer_note":"",'
    b'"committed_at":"2024-01-15T12:00:00+00:00","principal_delta":5,"other_creditor_id":3}'
)
SMP_HEADERS = {"message-type": "PendingBalanceChange", "debtor-id": DEBTOR, "creditor-id": CREDITOR}
BROKER_HEADERS = {
    "x-delivery-count": 4,
    "x-death": [{"count": 1, "queue": QUEUE, "reason": "rejected"}],
    "x-first-death-queue": QUEUE,
    "x-first-death-reason": "rejected",
    "x-last-death-queue": QUEUE,
}


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


def parked(args: list[str], database_url: str, rabbitmq_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pyswpt_command(), "parked", *args],
        env=driver_environment(database_url, rabbitmq_url),
        capture_output=True,
        text=True,
        timeout=60,
    )


def park(conn: psycopg.Connection, **fields: Any) -> int:
    """Park a refused PendingBalanceChange, or what `fields` say instead; return its id."""
    parcel = parking.Parcel(
        **{
            "source_kind": parking.SOURCE_QUEUE,
            "source_name": QUEUE,
            "exchange": "accounts_in",
            "routing_key": BALANCE_CHANGE_KEY,
            "message_type": "PendingBalanceChange",
            "content_type": "application/json",
            "headers": {**SMP_HEADERS, **BROKER_HEADERS},
            "body": BALANCE_CHANGE_BODY,
            "debtor_id": DEBTOR,
            "creditor_id": CREDITOR,
            "reason_code": "refused",
            "reason": "the database refused it: CHECK violation",
            "sqlstate": "23514",
            "attempts": 4,
            **fields,
        }
    )
    assert parking.park(conn, parcel) == "parked"
    return conn.execute("SELECT max(parked_id) FROM parked_message").fetchone()[0]


def park_unroutable(conn: psycopg.Connection) -> int:
    """Park an outgoing AccountUpdate that the broker returns: nothing is bound to to_debtors with its key."""
    return park(
        conn,
        source_kind=parking.SOURCE_OUTBOX,
        source_name="flush_account_updates",
        exchange="to_debtors",
        routing_key="ff.ff.ff.ff.ff.ff.ff.f0",
        message_type="AccountUpdate",
    )


def parked_ids(conn: psycopg.Connection) -> list[int]:
    return [parked_id for (parked_id,) in conn.execute("SELECT parked_id FROM parked_message ORDER BY 1")]


def test_list_shows_every_parked_message_filtered_by_reason_and_source(conn, database_url, rabbitmq_url):
    refused = park(conn)
    invalid = park(conn, reason_code="invalid", body=b"not json")
    flushed = park(conn, source_kind=parking.SOURCE_OUTBOX, source_name="flush_account_updates")

    result = parked(["list"], database_url, rabbitmq_url)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split()[:2] == ["ID", "SOURCE"]
    assert [int(line.split()[0]) for line in lines] == [refused, invalid, flushed]
    assert "the database refused it: CHECK violation" in lines[0]

    by_reason = parked(["list", "--reason", "refused", "--json"], database_url, rabbitmq_url)
    rows = [json.loads(line) for line in by_reason.stdout.splitlines()]
    assert [row["parked_id"] for row in rows] == [refused, flushed]
    assert rows[0]["body_bytes"] == len(BALANCE_CHANGE_BODY)

    by_both = parked(["list", "--reason", "refused", "--source", QUEUE, "--json"], database_url, rabbitmq_url)
    assert [json.loads(line)["parked_id"] for line in by_both.stdout.splitlines()] == [refused]


def shown(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


def test_show_prints_every_column_with_headers_and_the_json_body_as_text(conn, database_url, rabbitmq_url):
    parked_id = park(conn)
    result = parked(["show", str(parked_id)], database_url, rabbitmq_url)
    assert result.returncode == 0, result.stderr
    columns = shown(result)
    assert columns["body"] == BALANCE_CHANGE_BODY.decode()
    assert json.loads(columns["headers"]) == {**SMP_HEADERS, **BROKER_HEADERS}
    assert (columns["reason_code"], columns["sqlstate"], columns["attempts"]) == ("refused", "23514", "4")
    assert columns["routing_key"] == BALANCE_CHANGE_KEY
    assert len(columns) == len(conn.execute("SELECT * FROM parked_message").description)


def test_show_prints_a_body_that_is_not_json_in_hex(conn, database_url, rabbitmq_url):
    parked_id = park(conn, body=b"\xff\x00not json")
    columns = shown(parked(["show", str(parked_id)], database_url, rabbitmq_url))
    assert columns["body"].endswith(b"\xff\x00not json".hex())


def test_show_of_an_unknown_id_exits_1(conn, database_url, rabbitmq_url):
    result = parked(["show", "12345"], database_url, rabbitmq_url)
    assert result.returncode == 1
    assert result.stderr == "parked message 12345: not found\n"


def test_discard_forgets_the_named_messages_and_names_each_unknown_id(conn, database_url, rabbitmq_url):
    first = park(conn)
    second = park(conn, body=b"other")
    result = parked(["discard", str(first), "777", "778"], database_url, rabbitmq_url)
    assert result.returncode == 1
    assert result.stdout == "Discarded 1 parked messages.\n"
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == ["parked message 777", "parked message 778"]
    assert parked_ids(conn) == [second]


def test_discard_all_with_reason_keeps_other_reasons(conn, database_url, rabbitmq_url):
    park(conn)
    park(conn, body=b"other")
    invalid = park(conn, reason_code="invalid", body=b"bad")
    result = parked(["discard", "--all-with-reason", "refused"], database_url, rabbitmq_url)
    assert (result.returncode, result.stdout) == (0, "Discarded 2 parked messages.\n")
    assert parked_ids(conn) == [invalid]


def test_replayed_balance_change_reaches_accounts_in_unchanged_and_its_row_is_gone(conn, database_url, rabbitmq_url):
    parked_id = park(conn)
    with catching_queue(rabbitmq_url, [("accounts_in", BALANCE_CHANGE_KEY)]) as catcher:
        result = parked(["replay", str(parked_id)], database_url, rabbitmq_url)
        assert result.returncode == 0, result.stderr
        [message] = catcher.collect(1)
    assert result.stdout == "Replayed 1 parked messages.\n"
    assert (message.exchange, message.routing_key) == ("accounts_in", BALANCE_CHANGE_KEY)
    assert message.body == BALANCE_CHANGE_BODY
    assert (message.properties.type, message.properties.content_type) == ("PendingBalanceChange", "application/json")
    assert message.properties.headers == SMP_HEADERS
    assert message.properties.delivery_mode == 2
    assert parked_ids(conn) == []


def test_replayed_outgoing_message_goes_to_its_exchange(conn, database_url, rabbitmq_url):
    routing_key = sharding.hex_routing_key(CREDITOR)
    body = b'{"type":"AccountPurge","debtor_id":-2,"creditor_id":1099511627778}'
    parked_id = park(
        conn,
        source_kind=parking.SOURCE_OUTBOX,
        source_name="flush_account_purges",
        exchange="to_creditors",
        routing_key=routing_key,
        message_type="AccountPurge",
        headers={"message-type": "AccountPurge", "debtor-id": DEBTOR, "creditor-id": CREDITOR},
        body=body,
        reason_code="unroutable",
    )
    with catching_queue(rabbitmq_url, [("to_creditors", routing_key)]) as catcher:
        result = parked(["replay", "--all-with-reason", "unroutable"], database_url, rabbitmq_url)
        assert result.returncode == 0, result.stderr
        [message] = catcher.collect(1)
    assert (message.exchange, message.routing_key, message.body) == ("to_creditors", routing_key, body)
    assert (message.properties.type, message.properties.app_id) == ("AccountPurge", "swpt_accounts")
    assert parked_id not in parked_ids(conn)


def test_replay_of_an_unknown_id_exits_1_and_replays_the_others(conn, database_url, rabbitmq_url):
    parked_id = park(conn)
    with catching_queue(rabbitmq_url, [("accounts_in", BALANCE_CHANGE_KEY)]) as catcher:
        result = parked(["replay", "999", str(parked_id)], database_url, rabbitmq_url)
        catcher.collect(1)
    assert result.returncode == 1
    assert result.stderr.startswith("parked message 999: not found")
    assert len(result.stderr.splitlines()) == 1
    assert parked_ids(conn) == []


def test_a_row_without_body_is_not_replayed_and_kept(conn, database_url, rabbitmq_url):
    parked_id = park(
        conn,
        source_kind=parking.SOURCE_OUTBOX,
        source_name="flush_prepared_transfers",
        body=None,
        row_data={"debtor_id": "-2", "deadline": "10000-01-01 00:00:00+00"},
        reason_code="unencodable",
    )
    result = parked(["replay", str(parked_id)], database_url, rabbitmq_url)
    assert result.returncode == 1
    assert f"parked message {parked_id}: has no body" in result.stderr
    assert parked_ids(conn) == [parked_id]


def test_an_unroutable_replay_keeps_the_row_and_says_so(conn, database_url, rabbitmq_url):
    parked_id = park_unroutable(conn)
    result = parked(["replay", str(parked_id)], database_url, rabbitmq_url)
    assert result.returncode == 1
    assert f"parked message {parked_id}: the broker did not take it" in result.stderr
    assert "Replayed 0 parked messages." in result.stdout
    assert parked_ids(conn) == [parked_id]


def test_an_unroutable_replay_keeps_only_its_own_row(conn, database_url, rabbitmq_url):
    routable = park(conn)
    unroutable = park_unroutable(conn)
    with catching_queue(rabbitmq_url, [("accounts_in", BALANCE_CHANGE_KEY)]) as catcher:
        result = parked(["replay", str(routable), str(unroutable)], database_url, rabbitmq_url)
        catcher.collect(1)
    assert result.returncode == 1
    assert "Replayed 1 parked messages." in result.stdout
    assert parked_ids(conn) == [unroutable]


def test_a_chore_replays_through_the_default_exchange_to_its_queue(conn, database_url, rabbitmq_url):
    chores_queue = f"test_parked_chores_{uuid.uuid4().hex[:8]}"
    topology.declare_chores_queue(rabbitmq_url, chores_queue)
    try:
        parked_id = park(conn, exchange="", routing_key=chores_queue, message_type="TryToDeleteAccount")
        result = parked(["replay", str(parked_id)], database_url, rabbitmq_url)
        assert result.returncode == 0, result.stderr
        with topology.open_channel(rabbitmq_url) as channel:
            method, _properties, body = channel.basic_get(chores_queue, auto_ack=True)
        assert method is not None and body == BALANCE_CHANGE_BODY
    finally:
        with topology.open_channel(rabbitmq_url) as channel:
            channel.queue_delete(chores_queue)


def test_replay_without_ids_or_reason_is_bad_usage(database_url, rabbitmq_url):
    assert parked(["replay"], database_url, rabbitmq_url).returncode == 2
    assert parked(["discard", "1", "--all-with-reason", "refused"], database_url, rabbitmq_url).returncode == 2
