"""The table-scanner engine (spec 02 §4.3, spec 01 §8.3): rhythm, heap reader, pacing, and
the three `pyswpt run scan-*` drivers as real processes with short pass durations."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
import time
import types
import uuid
from collections.abc import Iterator

import psycopg
import psycopg.rows
import pytest
from broker import CAN_CLOSE_BROKER_CONNECTIONS, close_broker_connection_of
from drivers import children, driver_environment, running, wait_for
from factories import CONFIG_SCHEDULED_FOR_DELETION, STATUS_DELETED, failing_account_writes, insert_account

from pyswpt import db, topology
from pyswpt.drivers.scanners import engine
from pyswpt.drivers.scanners.accounts import AccountsScanner
from pyswpt.upgrades import ApiWait

UTC = dt.UTC
DAY = dt.timedelta(days=1)
HOUR_SECONDS = 3600.0
ACCOUNT_TABLE = types.SimpleNamespace(table_name="account", read_keys_query=AccountsScanner.read_keys_query)


# Rhythm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row_estimate", "rows_per_beat", "beats", "beat_seconds"),
    [
        (1_000_000, 10, 100_000, 0.288),
        (100_000_000, 348, 287_357, 8 * HOUR_SECONDS / 287_357),
        (0, 10, 5, 96 * 60.0),
        (-1, 10, 5, 96 * 60.0),  # never analysed
        (10_000_000_000, 5000, 2_000_000, 8 * HOUR_SECONDS / 2_000_000),
    ],
)
def test_rhythm_spreads_the_table_over_the_pass(row_estimate, rows_per_beat, beats, beat_seconds):
    rhythm = engine.calc_rhythm(row_estimate, 8 * HOUR_SECONDS, 100)
    assert (rhythm.rows_per_beat, rhythm.beats) == (rows_per_beat, beats)
    assert rhythm.beat_seconds == pytest.approx(beat_seconds)


@pytest.mark.parametrize(("row_estimate", "changed"), [(1000, False), (1240, False), (1260, True), (790, True)])
def test_new_rhythm_when_the_table_size_leaves_0_8_to_1_25(row_estimate, changed):
    rhythm = engine.Rhythm(total_rows=1000, rows_per_beat=10, beats=100, beat_seconds=1.0)
    assert engine.has_size_changed(rhythm, row_estimate, beats_between_checks=1) is changed


# Reader -----------------------------------------------------------------------------------------


def insert_accounts(conn: psycopg.Connection, count: int) -> set[tuple[int, int]]:
    conn.execute("SELECT lock_or_create_account(7, g, now()) FROM generate_series(1, %s) AS g", (count,))
    return {(7, creditor_id) for creditor_id in range(1, count + 1)}


def block_count(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT block_count FROM get_scanned_table_size('account')").fetchone()[0]


class RecordingReader(engine.BlockReader):
    """Remembers the block ranges it queried."""

    def __init__(self, *args):
        super().__init__(*args)
        self.queries: list[tuple[int, int]] = []

    def read(self, conn, first_block, count):
        self.queries.append((first_block, count))
        return super().read(conn, first_block, count)


@pytest.mark.parametrize("start", ["first", "middle", "last"])
def test_a_pass_from_any_block_takes_every_row_once(conn, database_url, start):
    expected = insert_accounts(conn, 600)
    blocks = block_count(conn)
    assert blocks > 6
    start_block = {"first": 0, "middle": blocks // 2, "last": blocks - 1}[start]
    reader = engine.BlockReader(ACCOUNT_TABLE, 2, start_block)
    taken: list[tuple[int, int]] = []
    with db.connect(database_url) as scan_conn:
        while len(taken) < len(expected):
            taken += reader.take(scan_conn, 25)
    # The first 600 rows taken are the 600 rows of the table, each once.
    assert set(taken[: len(expected)]) == expected


def test_a_beat_never_takes_a_row_twice_in_a_small_table(conn, database_url):
    expected = insert_accounts(conn, 3)
    reader = engine.BlockReader(ACCOUNT_TABLE, 40, 0)
    with db.connect(database_url) as scan_conn:
        assert sorted(reader.take(scan_conn, 10)) == sorted(expected)
        assert sorted(reader.take(scan_conn, 10)) == sorted(expected)


def test_reader_doubles_its_stride_over_emptied_blocks(conn, database_url):
    insert_accounts(conn, 2000)
    blocks = block_count(conn)
    conn.execute("DELETE FROM account WHERE creditor_id > 5 AND creditor_id <= 1995")
    reader = RecordingReader(ACCOUNT_TABLE, 1, 0)
    with db.connect(database_url) as scan_conn:
        assert len(reader.take(scan_conn, 10)) == 10
    strides = [count for _, count in reader.queries]
    assert strides[:6] == [1, 1, 2, 4, 8, 8]  # capped at MAX_FAST_FORWARD_FACTOR blocks per query
    assert len(reader.queries) < blocks / 2


def test_empty_table_gives_empty_beats(conn, database_url):
    reader = engine.BlockReader(ACCOUNT_TABLE, 40, 0)
    with db.connect(database_url) as scan_conn:
        assert reader.take(scan_conn, 10) == []


# Pacing -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RecordingScanner:
    table_name: str = "account"
    read_keys_query: str = AccountsScanner.read_keys_query
    beats: list[list[tuple]] = dataclasses.field(default_factory=list)
    pausing: threading.Event = dataclasses.field(default_factory=threading.Event)

    def steps(self):
        return [self.record]

    def record(self, conn, keys, now):
        self.beats.append(keys)

    def keep_alive(self):
        self.pausing.set()

    def close(self):
        pass


def test_one_pass_takes_the_configured_time_in_even_beats(conn, database_url):
    expected = insert_accounts(conn, 100)
    conn.execute("ANALYZE account")
    scanner = RecordingScanner()
    pace = engine.Pace(pass_seconds=1.0, beat_milliseconds=100, blocks_per_query=1)
    reader = engine.BlockReader(scanner, pace.blocks_per_query, 0)
    with db.connect(database_url) as scan_conn:
        started = time.monotonic()
        api_wait = ApiWait(300.0, "the test scanner")
        engine.run_rhythm(scan_conn, scanner, reader, pace, api_wait, threading.Event(), lambda: dt.datetime.now(UTC))
        elapsed = time.monotonic() - started
    # 100 rows over 1 s in beats of 100 ms: 10 beats of 10 rows, each row once.
    assert [len(keys) for keys in scanner.beats] == [10] * 10
    assert {key for keys in scanner.beats for key in keys} == expected
    assert 0.85 < elapsed < 1.5


def test_a_stop_request_ends_a_long_beat_within_a_second(conn, database_url):
    scanner = RecordingScanner()
    stopping = threading.Event()
    pace = engine.Pace(pass_seconds=8 * HOUR_SECONDS, beat_milliseconds=100, blocks_per_query=40)
    scanning = threading.Thread(
        target=engine.scan_until_stopped,
        args=(scanner, pace, database_url, stopping, ApiWait(300.0, "the test scanner")),
    )
    scanning.start()
    # An empty table: the first beat is followed by a 96-minute pause.
    assert scanner.pausing.wait(timeout=10)
    stopped_at = time.monotonic()
    stopping.set()
    scanning.join(timeout=5)
    assert not scanning.is_alive()
    assert time.monotonic() - stopped_at < 1.0


def scan_pass(conn: psycopg.Connection, table_name: str = "account") -> dict | None:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        return cursor.execute("SELECT * FROM scan_passes WHERE table_name = %s", (table_name,)).fetchone()


def test_a_pass_is_recorded_with_its_rows_when_it_ends(conn, database_url):
    insert_accounts(conn, 100)
    conn.execute("ANALYZE account")
    scanner = RecordingScanner()
    pace = engine.Pace(pass_seconds=1.0, beat_milliseconds=100, blocks_per_query=1)
    reader = engine.BlockReader(scanner, pace.blocks_per_query, 0)
    with db.connect(database_url) as scan_conn:
        engine.run_rhythm(
            scan_conn,
            scanner,
            reader,
            pace,
            ApiWait(300.0, "the test scanner"),
            threading.Event(),
            lambda: dt.datetime.now(UTC),
        )

    recorded = scan_pass(conn)
    assert recorded["pass_seconds"] == 1.0
    assert recorded["pass_row_estimate"] == 100
    assert recorded["last_pass_rows"] == 100
    assert recorded["last_pass_started_at"] == recorded["pass_started_at"]
    assert recorded["last_pass_ended_at"] == recorded["recorded_at"]


def test_a_scanner_records_that_it_runs_while_it_pauses_between_beats(conn, database_url, monkeypatch):
    monkeypatch.setattr(engine, "RECORD_INTERVAL_SECONDS", 0.05)
    scanner = RecordingScanner()
    stopping = threading.Event()
    # An empty table: the first beat is followed by a 96-minute pause.
    pace = engine.Pace(pass_seconds=8 * HOUR_SECONDS, beat_milliseconds=100, blocks_per_query=40)
    scanning = threading.Thread(
        target=engine.scan_until_stopped,
        args=(scanner, pace, database_url, stopping, ApiWait(300.0, "the test scanner")),
    )
    scanning.start()
    try:
        wait_for(lambda: scan_pass(conn) is not None, "the pass to be recorded")
        first = scan_pass(conn)["recorded_at"]
        wait_for(lambda: scan_pass(conn)["recorded_at"] > first, "the scanner to record again while it pauses")
    finally:
        stopping.set()
        scanning.join(timeout=5)
    recorded = scan_pass(conn)
    assert recorded["last_pass_ended_at"] is None
    assert scanner.pausing.is_set()


# The drivers -----------------------------------------------------------------------------------


@pytest.fixture
def chores_queue(rabbitmq_url) -> Iterator[str]:
    name = f"test_scan_engine_chores_{uuid.uuid4().hex[:8]}"
    topology.declare_chores_queue(rabbitmq_url, name)
    yield name
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_delete(name)


@contextlib.contextmanager
def scanner_process(args: list[str], database_url, rabbitmq_url, chores_queue, tmp_path, **settings: str):
    environ = driver_environment(database_url, rabbitmq_url, CHORES_BROKER_QUEUE=chores_queue, **settings)
    with running(args, environ, tmp_path) as scanner:
        yield scanner


def count(conn: psycopg.Connection, query: str) -> int:
    return conn.execute(query).fetchone()[0]


def test_scan_accounts_sends_heartbeats_and_purges_then_stops_on_sigterm(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    now = dt.datetime.now(UTC)
    insert_account(conn, 1, 2, now=now - 8 * DAY)
    insert_account(conn, 1, 3, now=now - 107 * DAY, status_flags=STATUS_DELETED)
    with scanner_process(
        ["run", "scan-accounts", "--hours", "0.001"], database_url, rabbitmq_url, chores_queue, tmp_path
    ) as scanner:
        wait_for(lambda: count(conn, "SELECT count(*) FROM account_update_signal") == 1, "a heartbeat")
        wait_for(lambda: count(conn, "SELECT count(*) FROM account_purge_signal") == 1, "a purge")
        stopped_at = time.monotonic()
        assert scanner.stop() == 0
        assert time.monotonic() - stopped_at < 2.0


def test_scan_prepared_transfers_sends_reminders(conn, database_url, rabbitmq_url, chores_queue, tmp_path):
    now = dt.datetime.now(UTC)
    insert_account(conn, 1, 2)
    conn.execute(
        "INSERT INTO prepared_transfer (debtor_id, sender_creditor_id, transfer_id, coordinator_type,"
        " coordinator_id, coordinator_request_id, recipient_creditor_id, prepared_at, final_interest_rate_ts,"
        " demurrage_rate, deadline, locked_amount) VALUES (1, 2, 1, 'direct', 2, 77, 1234, %s, %s, -50, %s, 100)",
        (now - 8 * DAY, now - 8 * DAY, now + 80 * DAY),
    )
    with scanner_process(
        ["run", "scan-prepared-transfers", "--days", "0.00005"], database_url, rabbitmq_url, chores_queue, tmp_path
    ):
        wait_for(lambda: count(conn, "SELECT count(*) FROM prepared_transfer_signal") == 1, "a reminder")


def test_run_scanners_runs_the_three_scanners_in_one_process_until_sigterm(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    now = dt.datetime.now(UTC)
    insert_account(conn, 1, 2, now=now - 8 * DAY)
    conn.execute(
        "INSERT INTO prepared_transfer (debtor_id, sender_creditor_id, transfer_id, coordinator_type,"
        " coordinator_id, coordinator_request_id, recipient_creditor_id, prepared_at, final_interest_rate_ts,"
        " demurrage_rate, deadline, locked_amount) VALUES (1, 2, 1, 'direct', 2, 77, 1234, %s, %s, -50, %s, 100)",
        (now - 8 * DAY, now - 8 * DAY, now + 80 * DAY),
    )
    conn.execute("INSERT INTO registered_balance_change VALUES (1, 2, 3, '2000-01-01T00:00:00Z', true)")
    with scanner_process(
        ["run", "scanners"],
        database_url,
        rabbitmq_url,
        chores_queue,
        tmp_path,
        APP_ACCOUNTS_SCAN_HOURS="0.001",
        APP_PREPARED_TRANSFERS_SCAN_DAYS="0.00005",
        APP_REGISTERED_BALANCE_CHANGES_SCAN_DAYS="0.00005",
        REMOVE_FROM_ARCHIVE_THRESHOLD_DATE="2010-01-01",
        APP_LOG_LEVEL="info",
    ) as scanners:
        wait_for(lambda: count(conn, "SELECT count(*) FROM account_update_signal") == 1, "a heartbeat")
        wait_for(lambda: count(conn, "SELECT count(*) FROM prepared_transfer_signal") == 1, "a reminder")
        wait_for(lambda: count(conn, "SELECT count(*) FROM registered_balance_change") == 0, "the cleanup")
        assert children(scanners.process.pid) == []
        assert scanners.stop() == 0
    assert scanners.log().count("Stopped scanning") == 3


def test_scan_registered_balance_changes_cleans_the_archive(conn, database_url, rabbitmq_url, chores_queue, tmp_path):
    conn.execute("INSERT INTO registered_balance_change VALUES (1, 2, 3, '2000-01-01T00:00:00Z', true)")
    with scanner_process(
        ["run", "scan-registered-balance-changes", "--days", "0.00005"],
        database_url,
        rabbitmq_url,
        chores_queue,
        tmp_path,
        REMOVE_FROM_ARCHIVE_THRESHOLD_DATE="2010-01-01",
    ):
        wait_for(lambda: count(conn, "SELECT count(*) FROM registered_balance_change") == 0, "the cleanup")


# Isolation (issue 8, observation 5) -------------------------------------------------------------

REFUSED_CREDITOR = 4
REFUSAL = "RAISE EXCEPTION 'update refused by the test' USING ERRCODE = 'check_violation', DETAIL = 'row contents';"


def heartbeat_creditors(conn: psycopg.Connection) -> set[int]:
    return {creditor_id for (creditor_id,) in conn.execute("SELECT creditor_id FROM account_update_signal")}


def test_scan_accounts_skips_a_row_its_step_fails_on_and_serves_the_others(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    now = dt.datetime.now(UTC)
    creditors = set(range(1, 9))
    for creditor_id in creditors:
        insert_account(conn, 1, creditor_id, now=now - 8 * DAY)
    with (
        failing_account_writes(conn, REFUSED_CREDITOR, REFUSAL) as stop_failing,
        scanner_process(
            ["run", "scan-accounts", "--hours", "0.001"], database_url, rabbitmq_url, chores_queue, tmp_path
        ) as scanner,
    ):
        wait_for(lambda: heartbeat_creditors(conn) == creditors - {REFUSED_CREDITOR}, "the other heartbeats")
        wait_for(lambda: f"key (1, {REFUSED_CREDITOR})" in scanner.log(), "the skipped row in the log")
        scanner.assert_alive()
        assert (
            f"Skipped account key (1, {REFUSED_CREDITOR}) in step send_heartbeats for this pass"
            " (SQLSTATE 23514: update refused by the test)." in scanner.log()
        )
        # A later pass serves it once the cause is gone.
        stop_failing()
        wait_for(lambda: heartbeat_creditors(conn) == creditors, "the heartbeat of the row skipped before")
        assert scanner.stop() == 0
    assert "row contents" not in scanner.log()


def test_scan_accounts_reconnects_after_losing_its_database_connection(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    now = dt.datetime.now(UTC)
    insert_account(conn, 1, 1, now=now - 8 * DAY)
    with scanner_process(
        ["run", "scan-accounts", "--hours", "0.001"], database_url, rabbitmq_url, chores_queue, tmp_path
    ) as scanner:
        wait_for(lambda: heartbeat_creditors(conn) == {1}, "the first heartbeat")
        terminated = count(
            conn,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'pyswpt scan account'",
        )
        assert terminated == 1
        insert_account(conn, 1, 2, now=now - 8 * DAY)
        wait_for(lambda: heartbeat_creditors(conn) == {1, 2}, "a heartbeat after the reconnection")
        scanner.assert_alive()
        assert "Scanning account failed (" in scanner.log()


@pytest.mark.skipif(
    not CAN_CLOSE_BROKER_CONNECTIONS,
    reason="needs a local RabbitMQ (rabbitmqctl) to close a connection from the broker's side",
)
def test_scan_accounts_outlives_the_broker_closing_its_connection(
    conn, database_url, rabbitmq_url, chores_queue, tmp_path
):
    insert_account(conn, 1, 2, config_flags=CONFIG_SCHEDULED_FOR_DELETION, principal=2)
    with scanner_process(
        ["run", "scan-accounts", "--hours", "0.001"],
        database_url,
        rabbitmq_url,
        chores_queue,
        tmp_path,
        APP_DELETION_ATTEMPTS_MIN_DAYS="0",
    ) as scanner:
        wait_for(lambda: chores_waiting(rabbitmq_url, chores_queue) > 0, "a deletion chore")
        close_broker_connection_of(scanner.process.pid, rabbitmq_url)
        with topology.open_channel(rabbitmq_url) as channel:
            channel.queue_purge(chores_queue)
        wait_for(lambda: chores_waiting(rabbitmq_url, chores_queue) > 0, "a chore on a new connection", 30)
        scanner.assert_alive()


def chores_waiting(rabbitmq_url: str, queue: str) -> int:
    with topology.open_channel(rabbitmq_url) as channel:
        return channel.queue_declare(queue, passive=True).method.message_count
