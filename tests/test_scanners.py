"""The scanners' beats (spec 02 §4.4-§4.5, spec 01 §5): what one beat does to the rows it read.

Each test arranges rows in SQL, runs one beat of a scanner (its steps) with an
explicit `now`, and looks at the outbox and at the chores the beat published
to a chores queue of its own on the real broker. The settings come from
`config.load`, as in production.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import psycopg
import pytest
from broker import ready_messages
from drivers import driver_environment, free_port, pyswpt_command, wait_for
from factories import (
    ACCOUNTS_IN_ONE_ANNOUNCEMENT,
    CONFIG_SCHEDULED_FOR_DELETION,
    DEFAULT_NOW,
    STATUS_DELETED,
    T0,
    announce_while_accounts_change,
    failing_account_writes,
    insert_account,
)
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from pyswpt import config, db, topology
from pyswpt.chores import ChoresPublisher
from pyswpt.drivers.scanners import accounts, engine, prepared_transfers, registered_balance_changes

NOW = DEFAULT_NOW
DAY = dt.timedelta(days=1)
SECOND = dt.timedelta(seconds=1)
LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
DEBTOR = -2
CREDITOR = 1099511627778
SHA256 = "AB" * 32
ROOT_CONFIG = json.dumps(
    {"rate": 2.5, "info": {"iri": "https://example.com/d", "contentType": "text/plain", "sha256": SHA256}}
)


def settings(database_url: str, rabbitmq_url: str, chores_queue: str = "unused", **environ: str) -> config.Config:
    return config.load(
        {
            "POSTGRES_URL": database_url,
            "CHORES_BROKER_URL": rabbitmq_url,
            "CHORES_BROKER_QUEUE": chores_queue,
            **environ,
        }
    )


@pytest.fixture
def chores_queue(rabbitmq_url) -> Iterator[str]:
    name = f"test_scan_chores_{uuid.uuid4().hex[:8]}"
    topology.declare_chores_queue(rabbitmq_url, name)
    yield name
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_delete(name)


@contextlib.contextmanager
def accounts_scanner(
    database_url: str, rabbitmq_url: str, chores_queue: str, **environ: str
) -> Iterator[accounts.AccountsScanner]:
    cfg = settings(database_url, rabbitmq_url, chores_queue, **environ)
    scanner = accounts.AccountsScanner(cfg, ChoresPublisher(rabbitmq_url, chores_queue), accounts.fetch_client(cfg))
    try:
        yield scanner
    finally:
        scanner.close()


def scan_accounts(
    database_url: str, rabbitmq_url: str, chores_queue: str, keys: list[tuple[int, int]], now=NOW, **environ: str
) -> list[tuple[pika.BasicProperties, bytes]]:
    """One accounts-scanner beat over `keys` at `now`; the chores it published."""
    with (
        accounts_scanner(database_url, rabbitmq_url, chores_queue, **environ) as scanner,
        db.connect(database_url) as conn,
    ):
        engine.process_beat(conn, scanner, keys, now)
    # The publisher waited for confirms, so every chore is in the queue.
    return ready_messages(rabbitmq_url, chores_queue)


def rows(conn: psycopg.Connection, query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(query, params).fetchall()


def account(conn: psycopg.Connection, debtor_id: int, creditor_id: int) -> dict[str, Any] | None:
    found = rows(conn, "SELECT * FROM account WHERE (debtor_id, creditor_id) = (%s, %s)", (debtor_id, creditor_id))
    return found[0] if found else None


def outbox(conn: psycopg.Connection, table: str) -> list[dict[str, Any]]:
    return rows(conn, f"SELECT * FROM {table} ORDER BY debtor_id, creditor_id")


# Heartbeats (spec 02 §2.11) ---------------------------------------------------------------------


def test_account_silent_for_longer_than_the_heartbeat_interval_gets_an_account_update(
    conn, database_url, rabbitmq_url, chores_queue
):
    insert_account(conn, DEBTOR, CREDITOR, now=NOW - 7 * DAY - SECOND)
    scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)])
    [update] = outbox(conn, "account_update_signal")
    assert update["inserted_at"] == NOW
    assert account(conn, DEBTOR, CREDITOR)["last_heartbeat_ts"] == NOW


def test_heartbeats_of_accounts_changed_during_the_beat_need_no_retry(conn, database_url, rabbitmq_url, chores_queue):
    # At REPEATABLE READ the step fails (40001) on the account changed after its snapshot,
    # and is retried; under load so would every retry.
    creditors = range(1, ACCOUNTS_IN_ONE_ANNOUNCEMENT + 1)
    for creditor_id in creditors:
        insert_account(conn, DEBTOR, creditor_id, now=NOW - DAY, pending_account_update=True)
    keys = [(DEBTOR, creditor_id) for creditor_id in creditors]
    retries_before = REGISTRY.get_sample_value("pyswpt_transaction_retries_total", {"sqlstate": "40001"}) or 0.0
    with (
        accounts_scanner(database_url, rabbitmq_url, chores_queue) as scanner,
        db.connect(database_url) as scanner_conn,
    ):
        change = f"UPDATE account SET principal = 700 WHERE debtor_id = {DEBTOR} AND creditor_id = {creditors[-1]}"
        sent = announce_while_accounts_change(
            conn,
            database_url,
            scanner_conn.info.backend_pid,
            lambda: scanner.send_heartbeats(scanner_conn, keys, NOW),
            change,
        )
    assert sent == len(creditors)
    assert [(row["creditor_id"], row["principal"]) for row in outbox(conn, "account_update_signal")][-1] == (
        creditors[-1],
        700,
    )
    retries = REGISTRY.get_sample_value("pyswpt_transaction_retries_total", {"sqlstate": "40001"}) or 0.0
    assert retries == retries_before


def test_heartbeat_interval_comes_from_app_account_heartbeat_days(conn, database_url, rabbitmq_url, chores_queue):
    insert_account(conn, DEBTOR, CREDITOR, now=NOW - 7 * DAY - SECOND)
    scan_accounts(
        database_url,
        rabbitmq_url,
        chores_queue,
        [(DEBTOR, CREDITOR)],
        APP_ACCOUNT_HEARTBEAT_DAYS="8",
        APP_MESSAGE_MAX_DELAY_DAYS="7",
    )
    assert outbox(conn, "account_update_signal") == []


def test_account_with_a_pending_update_gets_it_on_the_next_beat(conn, database_url, rabbitmq_url, chores_queue):
    insert_account(conn, DEBTOR, CREDITOR, now=NOW - DAY, pending_account_update=True)
    scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)])
    assert len(outbox(conn, "account_update_signal")) == 1
    assert account(conn, DEBTOR, CREDITOR)["pending_account_update"] is False


def test_deleted_account_gets_no_heartbeat(conn, database_url, rabbitmq_url, chores_queue):
    insert_account(conn, DEBTOR, CREDITOR, now=NOW - 30 * DAY, status_flags=STATUS_DELETED)
    scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)])
    assert outbox(conn, "account_update_signal") == []


# Purge (spec 02 §2.12) -----------------------------------------------------------------------------


def test_account_deleted_over_106_days_ago_is_purged_with_account_purge(conn, database_url, rabbitmq_url, chores_queue):
    insert_account(conn, DEBTOR, CREDITOR, now=NOW - 106 * DAY - SECOND, status_flags=STATUS_DELETED)
    scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)])
    assert account(conn, DEBTOR, CREDITOR) is None
    [purge] = outbox(conn, "account_purge_signal")
    assert (purge["debtor_id"], purge["creditor_id"], purge["inserted_at"]) == (DEBTOR, CREDITOR, NOW)
    assert purge["creation_date"] == (NOW - 106 * DAY - SECOND).date()


def test_account_deleted_106_days_ago_is_kept(conn, database_url, rabbitmq_url, chores_queue):
    insert_account(conn, DEBTOR, CREDITOR, now=NOW - 106 * DAY, status_flags=STATUS_DELETED)
    scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)])
    assert account(conn, DEBTOR, CREDITOR) is not None


def test_account_created_within_three_days_is_not_purged(conn, database_url, rabbitmq_url, chores_queue):
    insert_account(
        conn, DEBTOR, CREDITOR, now=NOW - 200 * DAY, status_flags=STATUS_DELETED, creation_date=(NOW - 3 * DAY).date()
    )
    scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)])
    assert account(conn, DEBTOR, CREDITOR) is not None
    assert outbox(conn, "account_purge_signal") == []


# Parent-shard cleanup (spec 01 §4.3-4.4) --------------------------------------------------------

# Spec 01 §4.2: (123, 456) is in 0.# but not in 0.1.#; (1, 3) is in 0.1.#.
PARENT_ONLY = (123, 456)
OWNED_BY_0_1 = (1, 3)


def test_parent_shard_accounts_are_deleted_when_delete_parent_shard_records_is_on(
    conn, database_url, rabbitmq_url, chores_queue
):
    insert_account(conn, *PARENT_ONLY)
    insert_account(conn, *OWNED_BY_0_1)
    scan_accounts(
        database_url,
        rabbitmq_url,
        chores_queue,
        [PARENT_ONLY, OWNED_BY_0_1],
        PROTOCOL_BROKER_QUEUE_ROUTING_KEY="0.1.#",
        DELETE_PARENT_SHARD_RECORDS="true",
    )
    assert account(conn, *PARENT_ONLY) is None
    assert account(conn, *OWNED_BY_0_1) is not None
    assert outbox(conn, "account_purge_signal") == []


def park_for(conn, debtor_id: int, creditor_id: int) -> None:
    conn.execute(
        "SELECT park_message(p_source_kind => 'queue', p_source_name => 'q', p_exchange => 'accounts_in',"
        " p_routing_key => %s, p_message_type => 'PrepareTransfer', p_content_type => 'application/json',"
        " p_headers => NULL, p_body => '{}'::bytea, p_row_data => NULL, p_debtor_id => %s, p_creditor_id => %s,"
        " p_reason_code => 'refused', p_reason => 'test', p_sqlstate => NULL, p_attempts => 1,"
        " p_next_retry_at => NULL, p_max_per_reason => 100)",
        (f"{debtor_id}/{creditor_id}", debtor_id, creditor_id),
    )


def test_parent_shard_parked_messages_are_deleted_when_delete_parent_shard_records_is_on(
    conn, database_url, rabbitmq_url, chores_queue
):
    insert_account(conn, *OWNED_BY_0_1)
    park_for(conn, *PARENT_ONLY)  # no such account here: the message is the sibling's all the same
    park_for(conn, *OWNED_BY_0_1)
    scan_accounts(
        database_url,
        rabbitmq_url,
        chores_queue,
        [OWNED_BY_0_1],
        PROTOCOL_BROKER_QUEUE_ROUTING_KEY="0.1.#",
        DELETE_PARENT_SHARD_RECORDS="true",
    )
    assert conn.execute("SELECT debtor_id, creditor_id FROM parked_message").fetchall() == [OWNED_BY_0_1]


def test_parent_shard_accounts_are_kept_when_delete_parent_shard_records_is_off(
    conn, database_url, rabbitmq_url, chores_queue
):
    insert_account(conn, *PARENT_ONLY)
    scan_accounts(database_url, rabbitmq_url, chores_queue, [PARENT_ONLY], PROTOCOL_BROKER_QUEUE_ROUTING_KEY="0.1.#")
    assert account(conn, *PARENT_ONLY) is not None


# Deletion and capitalization chores (spec 01 §5) ----------------------------------------------


def test_scheduled_account_with_negligible_balance_gets_a_try_to_delete_account_chore(
    conn, database_url, rabbitmq_url, chores_queue
):
    insert_account(conn, DEBTOR, CREDITOR, config_flags=CONFIG_SCHEDULED_FOR_DELETION, principal=2)
    [(properties, body)] = scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)])
    assert properties.type == "TryToDeleteAccount"
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.app_id == "swpt_accounts"
    # No headers of pyswpt's own; a quorum queue adds x-delivery-count.
    assert [name for name in properties.headers or {} if not name.startswith("x-")] == []
    assert body == b'{"type": "TryToDeleteAccount", "debtor_id": -2, "creditor_id": 1099511627778}'


def test_deletion_attempt_waits_app_deletion_attempts_min_days(conn, database_url, rabbitmq_url, chores_queue):
    insert_account(
        conn, DEBTOR, CREDITOR, config_flags=CONFIG_SCHEDULED_FOR_DELETION, last_deletion_attempt_ts=NOW - 13 * DAY
    )
    assert scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)]) == []


def test_account_with_much_accrued_interest_gets_a_capitalize_interest_chore(
    conn, database_url, rabbitmq_url, chores_queue
):
    insert_account(conn, DEBTOR, CREDITOR, now=NOW - 30 * DAY, principal=1_000_000, interest_rate=10.0)
    [(properties, body)] = scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)])
    assert properties.type == "CapitalizeInterest"
    assert body == b'{"type": "CapitalizeInterest", "debtor_id": -2, "creditor_id": 1099511627778}'


def test_capitalization_ratio_comes_from_app_max_interest_to_principal_ratio(
    conn, database_url, rabbitmq_url, chores_queue
):
    # 30 days at 10% on 1,000,000 accrue about 7,800: a ratio of 0.0078.
    insert_account(conn, DEBTOR, CREDITOR, now=NOW - 30 * DAY, principal=1_000_000, interest_rate=10.0)
    published = scan_accounts(
        database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)], APP_MAX_INTEREST_TO_PRINCIPAL_RATIO="0.01"
    )
    assert published == []


# Interest rate and debtor info (spec 02 §4.4 step 6) ------------------------------------------


def insert_root_account(conn: psycopg.Connection, debtor_id: int, config_data: str) -> None:
    insert_account(conn, debtor_id, 0, config_data=config_data)


def test_rate_and_info_chores_follow_a_local_root_config(conn, database_url, rabbitmq_url, chores_queue):
    insert_root_account(conn, DEBTOR, ROOT_CONFIG)
    insert_account(conn, DEBTOR, CREDITOR)
    published = scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, 0), (DEBTOR, CREDITOR)])
    assert [properties.type for properties, _ in published] == ["ChangeInterestRate", "UpdateDebtorInfo"]
    assert published[0][1] == (
        b'{"type": "ChangeInterestRate", "debtor_id": -2, "creditor_id": 1099511627778, "interest_rate": 2.5,'
        b' "ts": "2024-01-15T12:00:00+00:00"}'
    )
    assert json.loads(published[1][1]) == {
        "type": "UpdateDebtorInfo",
        "debtor_id": DEBTOR,
        "creditor_id": CREDITOR,
        "debtor_info_iri": "https://example.com/d",
        "debtor_info_content_type": "text/plain",
        "debtor_info_sha256": SHA256,
        "ts": "2024-01-15T12:00:00+00:00",
    }


def test_account_that_follows_its_root_config_gets_no_chores(conn, database_url, rabbitmq_url, chores_queue):
    insert_root_account(conn, DEBTOR, json.dumps({"rate": 3.567, "info": {"iri": "https://example.com/d"}}))
    # 3.567 is stored in single precision; it is equal all the same.
    insert_account(conn, DEBTOR, CREDITOR, interest_rate=3.567, debtor_info_iri="https://example.com/d")
    assert scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)]) == []


def test_empty_info_strings_count_as_absent(conn, database_url, rabbitmq_url, chores_queue):
    insert_root_account(conn, DEBTOR, json.dumps({"info": {"iri": "", "contentType": ""}}))
    insert_account(conn, DEBTOR, CREDITOR)
    assert scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)]) == []


def test_rate_changes_at_most_once_per_message_max_delay_plus_one_day(conn, database_url, rabbitmq_url, chores_queue):
    insert_root_account(conn, DEBTOR, json.dumps({"rate": 2.5}))
    insert_account(conn, DEBTOR, CREDITOR, last_interest_rate_change_ts=NOW - 8 * DAY + SECOND)
    assert scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)]) == []


def test_debtor_without_a_root_account_gets_no_settings_chores(conn, database_url, rabbitmq_url, chores_queue):
    insert_account(conn, DEBTOR, CREDITOR)
    assert scan_accounts(database_url, rabbitmq_url, chores_queue, [(DEBTOR, CREDITOR)]) == []


@contextlib.contextmanager
def fetch_api(database_url: str, rabbitmq_url: str, log_dir: Path) -> Iterator[str]:
    """`pyswpt run web` owning every account of the database; yields its base URL."""
    port = free_port()
    environ = driver_environment(
        database_url, rabbitmq_url, WEBSERVER_PORT=str(port), PROTOCOL_BROKER_QUEUE_ROUTING_KEY="#"
    )
    with open(log_dir / "web.log", "wb") as log:
        process = subprocess.Popen([*pyswpt_command(), "run", "web"], env=environ, stdout=log, stderr=log)
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base_url}/accounts/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, "the fetch API to start", deadline_seconds=30.0)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_rate_and_info_chores_follow_a_root_config_of_another_shard(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    # The root account (0, 0) is in 0.#; the scanner's shard is 1.#, so it asks the fetch API.
    insert_root_account(conn, 0, ROOT_CONFIG)
    insert_account(conn, 0, CREDITOR)
    with fetch_api(database_url, rabbitmq_url, tmp_path) as base_url:
        published = scan_accounts(
            database_url,
            rabbitmq_url,
            chores_queue,
            [(0, CREDITOR)],
            PROTOCOL_BROKER_QUEUE_ROUTING_KEY="1.#",
            FETCH_API_URL=base_url,
        )
    assert [(properties.type, json.loads(body)["debtor_id"]) for properties, body in published] == [
        ("ChangeInterestRate", 0),
        ("UpdateDebtorInfo", 0),
    ]


# Prepared-transfer reminders and archive cleanup (spec 02 §2.13-§2.14) ------------------------


def insert_prepared_transfer(conn: psycopg.Connection, debtor_id: int, sender_creditor_id: int, prepared_at) -> None:
    conn.execute(
        "INSERT INTO prepared_transfer (debtor_id, sender_creditor_id, transfer_id, coordinator_type,"
        " coordinator_id, coordinator_request_id, recipient_creditor_id, prepared_at, final_interest_rate_ts,"
        " demurrage_rate, deadline, locked_amount) VALUES (%s, %s, 1, 'direct', %s, 77, 1234, %s, %s, -50, %s, 100)",
        (debtor_id, sender_creditor_id, sender_creditor_id, prepared_at, T0, prepared_at + 90 * DAY),
    )


def test_transfer_prepared_over_7_days_ago_gets_a_prepared_transfer_reminder(conn, database_url, rabbitmq_url):
    insert_account(conn, DEBTOR, CREDITOR)
    insert_prepared_transfer(conn, DEBTOR, CREDITOR, NOW - 7 * DAY - SECOND)
    scanner = prepared_transfers.PreparedTransfersScanner(settings(database_url, rabbitmq_url))
    with db.connect(database_url) as scan_conn:
        assert scanner.send_reminders(scan_conn, [(DEBTOR, CREDITOR, 1)], NOW) == 1
    [reminder] = rows(conn, "SELECT * FROM prepared_transfer_signal")
    assert (reminder["transfer_id"], reminder["inserted_at"]) == (1, NOW)


def test_reminder_interval_comes_from_app_prepared_transfer_remainder_days(conn, database_url, rabbitmq_url):
    insert_account(conn, DEBTOR, CREDITOR)
    insert_prepared_transfer(conn, DEBTOR, CREDITOR, NOW - 7 * DAY - SECOND)
    scanner = prepared_transfers.PreparedTransfersScanner(
        settings(database_url, rabbitmq_url, APP_PREPARED_TRANSFER_REMAINDER_DAYS="10")
    )
    with db.connect(database_url) as scan_conn:
        assert scanner.send_reminders(scan_conn, [(DEBTOR, CREDITOR, 1)], NOW) == 0


def test_archive_cleanup_forgets_applied_changes_older_than_the_threshold_date(conn, database_url, rabbitmq_url):
    threshold = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
    for change_id, committed_at, is_applied in [
        (1, threshold - SECOND, True),
        (2, threshold - SECOND, False),
        (3, threshold, True),
    ]:
        conn.execute(
            "INSERT INTO registered_balance_change VALUES (%s, 5, %s, %s, %s)",
            (DEBTOR, change_id, committed_at, is_applied),
        )
    scanner = registered_balance_changes.RegisteredBalanceChangesScanner(
        settings(database_url, rabbitmq_url, REMOVE_FROM_ARCHIVE_THRESHOLD_DATE="2023-01-01")
    )
    keys = [(DEBTOR, 5, change_id) for change_id in (1, 2, 3)]
    with db.connect(database_url) as scan_conn:
        assert scanner.delete_applied_changes(scan_conn, keys, NOW) == 1
    assert [r["change_id"] for r in rows(conn, "SELECT change_id FROM registered_balance_change ORDER BY 1")] == [2, 3]


# Isolation (issue 8, observation 5) -------------------------------------------------------------


def test_a_row_that_a_step_fails_on_is_skipped_by_that_step_only(
    conn, database_url, rabbitmq_url, chores_queue, caplog
):
    insert_root_account(conn, DEBTOR, json.dumps({"rate": 2.5}))
    creditors = [CREDITOR - 1, CREDITOR, CREDITOR + 1]
    for creditor_id in creditors:
        insert_account(conn, DEBTOR, creditor_id, now=NOW - 8 * DAY)
    keys = [(DEBTOR, 0), *((DEBTOR, creditor_id) for creditor_id in creditors)]
    refusal = "RAISE EXCEPTION 'update refused by the test' USING ERRCODE = 'check_violation';"
    with failing_account_writes(conn, CREDITOR, refusal):
        published = scan_accounts(database_url, rabbitmq_url, chores_queue, keys)
    # The other accounts got their heartbeats; the refused one was skipped by that step...
    assert [r["creditor_id"] for r in outbox(conn, "account_update_signal")] == [CREDITOR - 1, CREDITOR + 1]
    assert [record.getMessage() for record in caplog.records if record.name == engine.__name__] == [
        f"Skipped account key ({DEBTOR}, {CREDITOR}) in step send_heartbeats for this pass"
        " (SQLSTATE 23514: update refused by the test)."
    ]
    # ...and by that step only: step 6 sent every account its rate, the refused one too.
    assert [(properties.type, json.loads(body)["creditor_id"]) for properties, body in published] == [
        ("ChangeInterestRate", creditor_id) for creditor_id in creditors
    ]
