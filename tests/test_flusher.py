"""The outbox flusher: exact messages out, rows deleted only after the broker confirmed them."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from broker import catching_queue, declare_smp_exchanges
from drivers import driver_environment, running, wait_for
from libpq_trace import round_trips, sent_queries, traced

from pyswpt import amqp, config, outbox, sharding, topology
from pyswpt.drivers import flusher

UTC = dt.UTC
NOW = dt.datetime(2024, 5, 20, 10, 15, 30, 123456, tzinfo=UTC)
DEBTOR = -2
CREDITOR = 1099511627778


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


def settings(database_url: str, rabbitmq_url: str, **environ: str) -> config.Config:
    return config.load({"POSTGRES_URL": database_url, "PROTOCOL_BROKER_URL": rabbitmq_url, **environ})


@pytest.fixture
def publisher(rabbitmq_url):
    batch_publisher = amqp.BatchPublisher(rabbitmq_url)
    yield batch_publisher
    batch_publisher.close()


def create_account(conn: psycopg.Connection, debtor_id: int, creditor_id: int) -> None:
    """A new account; its creation writes one AccountUpdate row to the outbox."""
    conn.execute("SELECT lock_or_create_account(%s, %s, %s)", (debtor_id, creditor_id, NOW))


def emit_balance_changes(conn: psycopg.Connection, count: int, creditor_id: int) -> None:
    conn.execute(
        "SELECT emit_pending_balance_change(%s, g, %s, 'direct', '', 'note', %s, 5, %s)"
        " FROM generate_series(1, %s) AS g",
        (DEBTOR, creditor_id, NOW, NOW, count),
    )


def outbox_count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def flush(database_url, publisher, table_name: str, cfg: config.Config, *, barrier_closed: bool = False) -> int:
    """Flush one table; with `barrier_closed` the barrier's session is closed first, so a barrier fails."""
    with flusher.connections(database_url) as (flush_conn, barrier_conn):
        if barrier_closed:
            barrier_conn.close()
        return flusher.flush_tables(flush_conn, barrier_conn, publisher, [outbox.TABLES_BY_NAME[table_name]], cfg)


def test_account_update_goes_to_the_creditor_with_exact_properties(conn, database_url, rabbitmq_url, publisher):
    create_account(conn, DEBTOR, CREDITOR)
    cfg = settings(database_url, rabbitmq_url)
    with catching_queue(rabbitmq_url, [("to_creditors", sharding.hex_routing_key(CREDITOR))]) as catcher:
        assert flush(database_url, publisher, "account_updates", cfg) == 1
        [message] = catcher.collect(1)

    assert message.exchange == "to_creditors"
    assert message.routing_key == "00.00.01.00.00.00.00.02"
    assert message.properties.content_type == "application/json"
    assert message.properties.type == "AccountUpdate"
    assert message.properties.delivery_mode == 2
    assert message.properties.app_id == "swpt_accounts"
    assert message.properties.headers == {
        "message-type": "AccountUpdate",
        "debtor-id": DEBTOR,
        "creditor-id": CREDITOR,
    }
    assert message.body.startswith(
        b'{"type":"AccountUpdate","debtor_id":-2,"creditor_id":1099511627778,'
        b'"last_change_ts":"2024-05-20T10:15:30.123456+00:00","last_change_seqnum":0,'
        b'"principal":0,"interest":0.0,"interest_rate":0.0,"transfer_note_max_bytes":500,'
        b'"demurrage_rate":-50.0,"last_interest_rate_change_ts":"1970-01-01T00:00:00+00:00",'
    )
    assert message.fields["account_id"] == "1099511627778"
    assert message.fields["ttl"] == 604800
    assert message.fields["commit_period"] == 7776000
    assert message.fields["debtor_info_sha256"] == ""
    assert outbox_count(conn, "account_update_signal") == 0


def test_pending_balance_change_goes_to_accounts_in_by_binary_key(conn, database_url, rabbitmq_url, publisher):
    recipient = 1099511627781
    emit_balance_changes(conn, 1, recipient)
    cfg = settings(database_url, rabbitmq_url)
    routing_key = sharding.binary_routing_key(DEBTOR, recipient)
    with catching_queue(rabbitmq_url, [("accounts_in", routing_key)]) as catcher:
        flush(database_url, publisher, "pending_balance_changes", cfg)
        [message] = catcher.collect(1)

    assert routing_key == "1.1.0.0.0.0.1.0.1.1.1.1.0.1.0.0.1.0.0.1.1.1.0.1"
    assert message.properties.headers == {
        "message-type": "PendingBalanceChange",
        "debtor-id": DEBTOR,
        "creditor-id": recipient,
    }
    assert message.fields == {
        "type": "PendingBalanceChange",
        "debtor_id": DEBTOR,
        "creditor_id": recipient,
        "change_id": 1,
        "coordinator_type": "direct",
        "transfer_note_format": "",
        "transfer_note": "note",
        "committed_at": "2024-05-20T10:15:30.123456+00:00",
        "principal_delta": 5,
        "other_creditor_id": 1,
    }


def test_the_flusher_commits_asynchronously_and_its_barriers_synchronously(database_url):
    with flusher.connections(database_url) as (conn, barrier_conn):
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
        assert barrier_conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"


def test_the_commits_of_a_burst_are_made_durable_before_it_is_published(conn, database_url, rabbitmq_url):
    # The row comes from an asynchronous commit, as a worker's rows do.
    conn.execute("SET synchronous_commit = off")
    create_account(conn, DEBTOR, CREDITOR)
    committed_up_to = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
    closed = amqp.BatchPublisher(rabbitmq_url)
    closed.close()  # publishing fails at once

    with pytest.raises(amqp.CONNECTION_ERRORS):
        flush(database_url, closed, "account_updates", settings(database_url, rabbitmq_url))

    # The barrier ran before the publishing that failed: the row's commit is on disk.
    assert conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (committed_up_to,)).fetchone()[0]
    assert outbox_count(conn, "account_update_signal") == 1


def test_rows_of_synchronous_commits_are_published_without_a_barrier(conn, database_url, rabbitmq_url, publisher):
    # The row comes from a synchronous commit, as a consumer's rows do: on disk before anyone saw it.
    create_account(conn, DEBTOR, CREDITOR)
    cfg = settings(database_url, rabbitmq_url)

    with catching_queue(rabbitmq_url, [("to_creditors", sharding.hex_routing_key(CREDITOR))]) as catcher:
        assert flush(database_url, publisher, "account_updates", cfg, barrier_closed=True) == 1
        [message] = catcher.collect(1)

    assert message.properties.type == "AccountUpdate"
    assert outbox_count(conn, "account_update_signal") == 0


def test_one_row_of_an_asynchronous_commit_makes_the_burst_wait_for_the_barrier(
    conn, database_url, rabbitmq_url, publisher
):
    create_account(conn, DEBTOR, CREDITOR)
    conn.execute("SET synchronous_commit = off")
    create_account(conn, DEBTOR, CREDITOR + 1)
    cfg = settings(database_url, rabbitmq_url)

    with pytest.raises(psycopg.OperationalError):
        flush(database_url, publisher, "account_updates", cfg, barrier_closed=True)

    # Nothing went out: both rows wait in the outbox for a barrier that works.
    assert outbox_count(conn, "account_update_signal") == 2


def test_unroutable_message_is_parked_for_a_retry(conn, database_url, rabbitmq_url, publisher):
    # No queue is bound for this creditor, so the mandatory message comes back.
    create_account(conn, DEBTOR, 0x7F00_0000_0000_0001)
    cfg = settings(database_url, rabbitmq_url)
    assert flush(database_url, publisher, "account_updates", cfg) == 1
    assert outbox_count(conn, "account_update_signal") == 0
    assert parked(conn) == [("account_updates", "unroutable", DEBTOR, 0x7F00_0000_0000_0001, True)]


def test_foreign_row_is_parked_for_an_operator(conn, database_url, rabbitmq_url, publisher):
    # Spec 01 §4.2: (123, 456) belongs to shard 0.#, not to 1.#.
    create_account(conn, 123, 456)
    cfg = settings(database_url, rabbitmq_url, PROTOCOL_BROKER_QUEUE_ROUTING_KEY="1.#")
    assert flush(database_url, publisher, "account_updates", cfg) == 1
    assert outbox_count(conn, "account_update_signal") == 0
    assert parked(conn) == [("account_updates", "foreign_shard", 123, 456, False)]


def parked(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT source_name, reason_code, debtor_id, creditor_id, next_retry_at IS NOT NULL"
        " FROM parked_message WHERE source_kind = 'outbox' ORDER BY parked_id"
    ).fetchall()


def test_parent_shard_row_is_dropped_when_cleanup_is_on(conn, database_url, rabbitmq_url, publisher):
    create_account(conn, 123, 456)
    cfg = settings(
        database_url, rabbitmq_url, PROTOCOL_BROKER_QUEUE_ROUTING_KEY="1.#", DELETE_PARENT_SHARD_RECORDS="true"
    )
    assert flush(database_url, publisher, "account_updates", cfg) == 1
    assert outbox_count(conn, "account_update_signal") == 0


class CountingPublisher(amqp.BatchPublisher):
    """The real publisher, counting its batches: each is one wait for the broker's confirms."""

    batches = 0

    def publish_each(self, messages):
        self.batches += 1
        return super().publish_each(messages)


@pytest.fixture
def counting_publisher(rabbitmq_url):
    publisher = CountingPublisher(rabbitmq_url)
    yield publisher
    publisher.close()


RECIPIENT = 1099511627781


def recipient_with_changes(conn: psycopg.Connection, count: int) -> None:
    """RECIPIENT's account (an AccountUpdate row) and `count` PendingBalanceChange rows to it."""
    create_account(conn, DEBTOR, RECIPIENT)
    emit_balance_changes(conn, count, RECIPIENT)


def flush_both_tables(database_url, rabbitmq_url, publisher, cfg: config.Config, expected: int) -> list:
    """One flush_tables call over the AccountUpdates and PendingBalanceChanges; the messages, as received."""
    with catching_both_tables(rabbitmq_url) as catcher, flusher.connections(database_url) as connections:
        assert flusher.flush_tables(*connections, publisher, BOTH_TABLES, cfg) == expected
        return catcher.collect(expected)


BOTH_TABLES = [outbox.TABLES_BY_NAME[name] for name in ("account_updates", "pending_balance_changes")]


def catching_both_tables(rabbitmq_url):
    """A queue bound for RECIPIENT's AccountUpdates and PendingBalanceChanges."""
    bindings = [
        ("to_creditors", sharding.hex_routing_key(RECIPIENT)),
        ("accounts_in", sharding.binary_routing_key(DEBTOR, RECIPIENT)),
    ]
    return catching_queue(rabbitmq_url, bindings)


def recorded_takes(monkeypatch) -> list[str]:
    """The tables taken from, in order (they are still taken)."""
    taken: list[str] = []
    take_group = flusher.take_group

    def recording(conn, tables, config, **options):
        taken.extend(table.name for table in tables)
        return take_group(conn, tables, config, **options)

    monkeypatch.setattr(flusher, "take_group", recording)
    return taken


def test_a_round_publishes_every_table_in_one_batch_in_table_order(
    conn, database_url, rabbitmq_url, counting_publisher
):
    recipient_with_changes(conn, 2)
    cfg = settings(database_url, rabbitmq_url)

    messages = flush_both_tables(database_url, rabbitmq_url, counting_publisher, cfg, 3)

    assert counting_publisher.batches == 1
    assert [m.properties.type for m in messages] == ["AccountUpdate", "PendingBalanceChange", "PendingBalanceChange"]
    assert outbox_count(conn, "account_update_signal") == outbox_count(conn, "pending_balance_change_signal") == 0


def test_a_full_burst_is_followed_by_another_of_its_table_only(
    conn, database_url, rabbitmq_url, counting_publisher, monkeypatch
):
    recipient_with_changes(conn, 3)
    cfg = settings(database_url, rabbitmq_url, APP_FLUSH_PENDING_BALANCE_CHANGES_BURST_COUNT="2")
    taken = recorded_takes(monkeypatch)

    flush_both_tables(database_url, rabbitmq_url, counting_publisher, cfg, 4)

    assert taken == ["account_updates", "pending_balance_changes", "pending_balance_changes"]
    assert counting_publisher.batches == 2


def test_tables_past_the_rows_of_one_transaction_wait_for_the_next_in_order(
    conn, database_url, rabbitmq_url, counting_publisher, monkeypatch
):
    recipient_with_changes(conn, 1)
    cfg = settings(database_url, rabbitmq_url, APP_FLUSH_ACCOUNT_UPDATES_BURST_COUNT="1")
    monkeypatch.setattr(flusher, "MAX_ROWS_PER_TRANSACTION", 1)
    taken = recorded_takes(monkeypatch)

    messages = flush_both_tables(database_url, rabbitmq_url, counting_publisher, cfg, 2)

    # The full account_updates burst is taken again before the table that was not reached.
    assert taken == ["account_updates", "account_updates", "pending_balance_changes"]
    assert [m.properties.type for m in messages] == ["AccountUpdate", "PendingBalanceChange"]


def test_a_round_takes_its_tables_in_one_round_trip_and_commits_in_another(conn, database_url, rabbitmq_url, publisher):
    recipient_with_changes(conn, 2)
    with catching_both_tables(rabbitmq_url) as catcher, flusher.connections(database_url) as connections:
        with traced(connections[0]) as lines:
            assert flusher.flush_tables(*connections, publisher, BOTH_TABLES, settings(database_url, rabbitmq_url)) == 3
        assert len(catcher.collect(3)) == 3

    # BEGIN, the WAL position, both takes; then COMMIT, after the broker confirmed.
    assert round_trips(lines) == 2
    assert [[statement.split("(")[0] for statement in query] for query in sent_queries(lines)] == [
        [
            "BEGIN",
            "SELECT pyswpt_api.current_wal_position",
            "SELECT * FROM pyswpt_api.take_account_update_signals",
            "SELECT * FROM pyswpt_api.take_pending_balance_change_signals",
        ],
        ["COMMIT"],
    ]
    assert outbox_count(conn, "account_update_signal") == outbox_count(conn, "pending_balance_change_signal") == 0


def test_a_transaction_takes_no_table_whose_full_burst_would_pass_its_rows(
    conn, database_url, rabbitmq_url, counting_publisher, monkeypatch
):
    recipient_with_changes(conn, 1)
    cfg = settings(database_url, rabbitmq_url, APP_FLUSH_ACCOUNT_UPDATES_BURST_COUNT="2")
    monkeypatch.setattr(flusher, "MAX_ROWS_PER_TRANSACTION", 3)
    taken = recorded_takes(monkeypatch)

    messages = flush_both_tables(database_url, rabbitmq_url, counting_publisher, cfg, 2)

    # One AccountUpdate was taken, but a full burst of the other table (5000) would pass 3 rows.
    assert taken == ["account_updates", "pending_balance_changes"]
    assert counting_publisher.batches == 2
    assert [m.properties.type for m in messages] == ["AccountUpdate", "PendingBalanceChange"]


def test_running_flusher_wakes_on_notify_before_its_period(conn, database_url, rabbitmq_url, tmp_path):
    environ = driver_environment(database_url, rabbitmq_url, FLUSH_PERIOD="86400", FLUSH_PROCESSES="1")
    recipient = 1099511627781
    with catching_queue(rabbitmq_url, [("accounts_in", sharding.binary_routing_key(DEBTOR, recipient))]) as catcher:
        with running(["run", "flusher"], environ, tmp_path) as flusher_process:
            wait_for(lambda: "LISTEN" in listening_queries(conn), "the flusher to LISTEN")
            emit_balance_changes(conn, 3, recipient)
            messages = catcher.collect(3)
            flusher_process.assert_alive()
    assert sorted(m.fields["other_creditor_id"] for m in messages) == [1, 2, 3]


def test_every_outbox_table_notifies_the_flusher_with_its_name(conn):
    rows = conn.execute(
        "SELECT tgrelid::regclass::text, encode(tgargs, 'escape') FROM pg_trigger WHERE tgname = 'notify_filled'"
    ).fetchall()
    notifying = {table.removeprefix("pyswpt."): args for table, args in rows}
    assert {table.signal_table: notifying.get(table.signal_table) for table in outbox.TABLES} == {
        table.signal_table: f"{flusher.NOTIFY_CHANNEL}\\000" for table in outbox.TABLES
    }


def create_account_without_notify(conn: psycopg.Connection, creditor_id: int) -> None:
    """Its AccountUpdate row as if its NOTIFY was lost: triggers do not fire for a replica session."""
    conn.execute("SET session_replication_role = replica")
    create_account(conn, DEBTOR, creditor_id)
    conn.execute("SET session_replication_role = DEFAULT")


def test_a_round_woken_by_notify_flushes_only_the_tables_it_names(conn, database_url, rabbitmq_url, tmp_path):
    environ = driver_environment(database_url, rabbitmq_url, FLUSH_PERIOD="86400", FLUSH_PROCESSES="1")
    recipient = 1099511627781
    with catching_queue(rabbitmq_url, [("accounts_in", sharding.binary_routing_key(DEBTOR, recipient))]) as catcher:
        with running(["run", "flusher"], environ, tmp_path):
            wait_for(lambda: "LISTEN" in listening_queries(conn), "the flusher to LISTEN")
            create_account_without_notify(conn, CREDITOR)
            emit_balance_changes(conn, 1, recipient)
            catcher.collect(1)
            wait_for(lambda: outbox_count(conn, "pending_balance_change_signal") == 0, "the flushed row's commit")
            assert outbox_count(conn, "account_update_signal") == 1


def test_a_full_round_every_flush_period_flushes_what_no_notify_named(conn, database_url, rabbitmq_url, tmp_path):
    environ = driver_environment(database_url, rabbitmq_url, FLUSH_PERIOD="0.5", FLUSH_PROCESSES="1")
    with running(["run", "flusher"], environ, tmp_path):
        wait_for(lambda: "LISTEN" in listening_queries(conn), "the flusher to LISTEN")
        create_account_without_notify(conn, CREDITOR)
        wait_for(lambda: outbox_count(conn, "account_update_signal") == 0, "a full round")


def test_two_flushers_publish_every_row_once(conn, database_url, rabbitmq_url, tmp_path):
    environ = driver_environment(database_url, rabbitmq_url, FLUSH_PERIOD="0.2", FLUSH_PROCESSES="2")
    recipient = 1099511627781
    count = 3000
    emit_balance_changes(conn, count, recipient)
    with catching_queue(rabbitmq_url, [("accounts_in", sharding.binary_routing_key(DEBTOR, recipient))]) as catcher:
        with running(["run", "flusher"], environ, tmp_path):
            wait_for(lambda: outbox_count(conn, "pending_balance_change_signal") == 0, "an empty outbox", 60)
        received = catcher.collect(count, timeout_seconds=60)
        with topology.open_channel(rabbitmq_url) as channel:
            assert channel.queue_declare(catcher.queue, passive=True).method.message_count == 0
    assert len({m.fields["other_creditor_id"] for m in received}) == count


def listening_queries(conn: psycopg.Connection) -> str:
    rows = conn.execute(
        "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'pyswpt flusher listen'"
    ).fetchall()
    return " ".join(query for (query,) in rows)


def test_flusher_reconnects_after_losing_its_database_connections(conn, database_url, rabbitmq_url, tmp_path):
    environ = driver_environment(database_url, rabbitmq_url, FLUSH_PERIOD="0.2", FLUSH_PROCESSES="1")
    recipient = 1099511627781
    with catching_queue(rabbitmq_url, [("accounts_in", sharding.binary_routing_key(DEBTOR, recipient))]) as catcher:
        with running(["run", "flusher"], environ, tmp_path) as flusher_process:
            wait_for(lambda: "LISTEN" in listening_queries(conn), "the flusher to LISTEN")
            terminated = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE 'pyswpt flusher%%'"
            ).fetchone()[0]
            assert terminated == 2
            emit_balance_changes(conn, 1, recipient)
            [message] = catcher.collect(1)
            flusher_process.assert_alive()
            assert "Reconnecting in" in flusher_process.log()
    assert message.fields["other_creditor_id"] == 1
