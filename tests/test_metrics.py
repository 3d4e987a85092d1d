"""The node's Prometheus metrics, scraped from real processes after real traffic (issue 11).

`pyswpt run all` serves one endpoint for every process of the node: the
counters must move by what the test sent, survive the restart of the process
that counted them, and count the restarts themselves. The database's figures
(backlogs, oldest ages) come from `pyswpt run metrics` over rows the test
queued. The readiness probe says whether the node reaches its servers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from broker import declare_smp_exchanges
from conftest import with_database
from drivers import driver_environment, free_port, healthy, running, started_pids, wait_for
from peers import funded_pair, open_shard, prepare_and_take, process_group
from prometheus_client.parser import text_string_to_metric_families

from pyswpt import topology
from pyswpt.drivers.supervisor import PROGRAMS
from pyswpt.sharding import u64_string

# One pass of each scanner takes about a second; nothing else runs faster than by default.
SCAN_PASS_SECONDS = 1.0
SCAN_SETTINGS = {
    "APP_ACCOUNTS_SCAN_HOURS": str(SCAN_PASS_SECONDS / 3600),
    "APP_ACCOUNTS_SCAN_BEAT_MILLISECS": "50",
    "APP_PREPARED_TRANSFERS_SCAN_DAYS": str(SCAN_PASS_SECONDS / 86400),
    "APP_PREPARED_TRANSFERS_SCAN_BEAT_MILLISECS": "50",
    "APP_REGISTERED_BALANCE_CHANGES_SCAN_DAYS": str(SCAN_PASS_SECONDS / 86400),
    "APP_REGISTERED_BALANCE_CHANGES_SCAN_BEAT_MILLISECS": "50",
}
TRANSFERS = 3
# Five Python processes start at once; on a loaded two-core machine none had logged a line after 30 s.
STARTED_WITHIN_SECONDS = 60.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, by name and labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def answers(port: int) -> bool:
    try:
        scrape(port)
    except httpx.TransportError:
        return False
    return True


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


@pytest.fixture
def shard(conn, database_url, rabbitmq_url, tmp_path):
    chores_queue = f"pyswpt_test_metrics_chores_{uuid.uuid4().hex[:10]}"
    topology.declare_chores_queue(rabbitmq_url, chores_queue)
    web_port, metrics_port = free_port(), free_port()
    settings = {
        **SCAN_SETTINGS,
        "CHORES_BROKER_QUEUE": chores_queue,
        "WEBSERVER_PORT": str(web_port),
        "FETCH_API_URL": f"http://127.0.0.1:{web_port}",
        "METRICS_PORT": str(metrics_port),
    }
    try:
        with open_shard(
            conn,
            database_url,
            rabbitmq_url,
            tmp_path,
            queue_prefix="pyswpt_test_metrics",
            relaxed=True,
            settings=settings,
        ) as opened:
            yield opened
    finally:
        with topology.open_channel(rabbitmq_url) as channel:
            channel.queue_delete(chores_queue)


@pytest.fixture
def node(shard, tmp_path) -> Iterator[Path]:
    """`pyswpt run all` of the shard, every driver started and the metrics endpoint answering; its log's path."""
    log_path = tmp_path / "run-all.log"
    with process_group(["run", "all"], shard.environment(), log_path) as process:
        wait_for(
            lambda: process.poll() is None and set(started_pids(log_path.read_text())) == set(PROGRAMS),
            "every driver to start",
            STARTED_WITHIN_SECONDS,
        )
        wait_for(lambda: answers(int(shard.settings["METRICS_PORT"])), "the metrics endpoint", STARTED_WITHIN_SECONDS)
        wait_for(lambda: healthy(int(shard.settings["WEBSERVER_PORT"])), "the fetch API", STARTED_WITHIN_SECONDS)
        yield log_path
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_run_all_counts_the_messages_of_real_traffic(shard, node):
    port = int(shard.settings["METRICS_PORT"])
    queue = shard.queue
    sender, recipient = funded_pair(shard, 10 * TRANSFERS)
    shard.settle()
    before = scrape(port)

    for request_id in range(TRANSFERS):
        prepared = prepare_and_take(shard, sender, recipient, request_id=100 + request_id, min_locked=1, max_locked=1)
        shard.finalize(prepared, 1)
    shard.publish("PrepareTransfer", {"debtor_id": shard.debtor_id})  # invalid: parked
    shard.settle()
    after = scrape(port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    consumed = "pyswpt_messages_consumed_total"
    assert moved(consumed, queue=queue, type="PrepareTransfer", outcome="applied") == TRANSFERS
    assert moved(consumed, queue=queue, type="FinalizeTransfer", outcome="applied") == TRANSFERS
    # Within one shard a balance change is queued by the finalization: it does not travel.
    assert moved(consumed, queue=queue, type="PendingBalanceChange", outcome="applied") == 0
    assert moved(consumed, queue=queue, type="PrepareTransfer", outcome="parked") == 1
    assert moved(consumed, queue=queue, outcome="redelivered") == 0
    assert moved("pyswpt_consume_to_commit_seconds_count", queue=queue) >= 2 * TRANSFERS + 1
    assert moved("pyswpt_consumer_window_messages_sum", queue=queue) >= 2 * TRANSFERS + 1
    published = "pyswpt_messages_published_total"
    for message_type in ("PreparedTransfer", "FinalizedTransfer"):
        assert moved(published, type=message_type, outcome="confirmed") == TRANSFERS, message_type
    assert moved(published, type="PendingBalanceChange", outcome="confirmed") == 0
    # Both accounts' AccountTransfers, and AccountUpdates for at least the changes.
    assert moved(published, type="AccountTransfer", outcome="confirmed") == 2 * TRANSFERS
    assert moved("pyswpt_commit_to_publish_seconds_count", table="prepared_transfers") == TRANSFERS
    assert moved("pyswpt_commit_to_publish_seconds_count", table="finalized_transfers") == TRANSFERS
    # Each transfer's PreparedTransfer, FinalizedTransfer and two AccountTransfers, at least.
    assert moved("pyswpt_flusher_round_rows_sum") >= 4 * TRANSFERS
    assert moved("pyswpt_flusher_round_rows_count") >= 1
    # The consumer prepares and finalizes at once where it can; a queued FinalizeTransfer wakes the stage.
    assert moved("pyswpt_worker_rounds_total", stage="finalization_requests") >= 1
    # Read from the database, cached a few seconds.
    wait_for(
        lambda: value(scrape(port), "pyswpt_parked_messages", source=queue, reason="invalid") == 1,
        "the parked message to show",
    )


def test_run_all_counts_scanner_passes_and_restarts_and_keeps_the_counts_of_dead_processes(shard, node):
    port = int(shard.settings["METRICS_PORT"])
    sender, _recipient = funded_pair(shard, 10)
    shard.settle()
    wait_for(
        lambda: value(scrape(port), "pyswpt_scanner_passes_total", table="account") >= 1, "a whole pass over accounts"
    )
    samples = scrape(port)
    assert value(samples, "pyswpt_scanner_rows_total", table="account") >= 3
    assert value(samples, "pyswpt_scanner_last_pass_duration_seconds", table="account") > 0
    configured = value(samples, "pyswpt_messages_consumed_total", type="ConfigureAccount", outcome="applied")
    assert configured >= 3
    assert value(samples, "pyswpt_driver_restarts_total") == 0

    [consumer_pid] = started_pids(node.read_text())["consumer"]
    os.kill(consumer_pid, signal.SIGKILL)
    wait_for(lambda: len(started_pids(node.read_text())["consumer"]) == 2, "the consumer to be restarted")
    wait_for(
        lambda: value(scrape(port), "pyswpt_driver_restarts_total", driver="consumer") == 1, "the restart to be counted"
    )
    # The killed process's counts stay in the sums, and the new one counts on.
    shard.settle()
    assert (
        value(scrape(port), "pyswpt_messages_consumed_total", type="ConfigureAccount", outcome="applied")
        == configured + 1
    )
    assert value(scrape(port), "pyswpt_driver_restarts_total") == 1


def test_the_fetch_api_counts_requests_by_route_and_status(shard, node):
    port = int(shard.settings["METRICS_PORT"])
    web = f"http://127.0.0.1:{shard.settings['WEBSERVER_PORT']}"
    debtor = u64_string(shard.debtor_id)
    route = "/accounts/{debtor_id:u64}/{creditor_id:u64}/reachable"
    before = scrape(port)
    for creditor in (1, 2):
        assert httpx.get(f"{web}/accounts/{debtor}/{creditor}/reachable", timeout=5).status_code == 404
    assert httpx.get(f"{web}/nowhere", timeout=5).status_code == 404
    after = scrape(port)
    requests = "pyswpt_fetch_api_requests_total"
    assert value(after, requests, route=route, status="404") - value(before, requests, route=route, status="404") == 2
    assert value(after, requests, route="unmatched") - value(before, requests, route="unmatched") == 1
    assert value(after, "pyswpt_fetch_api_request_duration_seconds_count", route=route) >= 2


def test_the_database_figures_show_queued_work_and_the_outbox(conn, database_url, rabbitmq_url, tmp_path):
    """Requests queued with no worker running, and outbox rows with no flusher: counted, aged."""
    debtor_id = 7
    conn.execute(
        "INSERT INTO transfer_request (debtor_id, sender_creditor_id, coordinator_type, coordinator_id,"
        " coordinator_request_id, min_locked_amount, max_locked_amount, deadline, recipient_creditor_id,"
        " final_interest_rate_ts, enqueued_at)"
        " SELECT %s, s.creditor, 'direct', 1, s.request, 0, 0, now(), 2, now(), now() - interval '1 minute'"
        " FROM (VALUES (1, 1), (1, 2), (3, 3)) AS s(creditor, request)",
        (debtor_id,),
    )
    conn.execute(
        "INSERT INTO account_purge_signal (debtor_id, creditor_id, creation_date, inserted_at)"
        " VALUES (%s, 1, current_date, now() - interval '2 minutes'), (%s, 2, current_date, now())",
        (debtor_id, debtor_id),
    )
    port = free_port()
    environ = driver_environment(database_url, rabbitmq_url, METRICS_PORT=str(port))
    with running(["run", "metrics"], environ, tmp_path):
        wait_for(lambda: answers(port), "the metrics endpoint")
        samples = scrape(port)
    assert value(samples, "pyswpt_database_metrics_up") == 1
    assert value(samples, "pyswpt_work_queue_requests", stage="transfer_requests") == 3
    assert value(samples, "pyswpt_work_queue_accounts", stage="transfer_requests") == 2
    assert 60 <= value(samples, "pyswpt_work_queue_oldest_request_age_seconds", stage="transfer_requests") < 600
    assert value(samples, "pyswpt_work_queue_requests", stage="balance_changes") == 0
    assert value(samples, "pyswpt_outbox_backlog_rows", table="account_purges") == 2
    assert 120 <= value(samples, "pyswpt_outbox_oldest_row_age_seconds", table="account_purges") < 600
    assert value(samples, "pyswpt_outbox_backlog_rows", table="account_updates") == 0


def test_a_driver_run_alone_serves_its_own_metrics_when_metrics_port_is_set(database_url, rabbitmq_url, tmp_path):
    port = free_port()
    environ = driver_environment(database_url, rabbitmq_url, METRICS_PORT=str(port), **SCAN_SETTINGS)
    with running(["run", "workers"], environ, tmp_path):
        wait_for(lambda: answers(port), "the workers' metrics endpoint")
        wait_for(
            lambda: value(scrape(port), "pyswpt_worker_rounds_total", stage="balance_changes") >= 1, "a worker round"
        )


# --- readiness -------------------------------------------------------------------------------


def probe(port: int, what: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/accounts/{what}", timeout=30)


def test_readiness_is_ready_when_the_database_and_broker_answer(database_url, rabbitmq_url, tmp_path):
    port = free_port()
    with running(["run", "web"], driver_environment(database_url, rabbitmq_url, WEBSERVER_PORT=str(port)), tmp_path):
        wait_for(lambda: answers_http(port), "the fetch API")
        ready = probe(port, "readyz")
    assert (ready.status_code, ready.text) == (200, "I am ready")


@pytest.mark.parametrize("unreachable", ["database", "missing_database", "broker"])
def test_readiness_is_not_ready_when_a_server_is_unreachable(
    postgres_server_url, database_url, rabbitmq_url, tmp_path, unreachable
):
    port = free_port()
    closed_port = free_port()
    settings = {"WEBSERVER_PORT": str(port)}
    if unreachable == "database":
        database_url = f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    elif unreachable == "missing_database":
        database_url = with_database(postgres_server_url, f"pyswpt_missing_{uuid.uuid4().hex[:8]}")
    else:
        settings["PROTOCOL_BROKER_URL"] = settings["CHORES_BROKER_URL"] = f"amqp://guest:guest@127.0.0.1:{closed_port}/"
    environ = {**driver_environment(database_url, rabbitmq_url), **settings}
    with running(["run", "web"], environ, tmp_path):
        wait_for(lambda: answers_http(port), "the fetch API")
        not_ready = probe(port, "readyz")
        # Liveness stays as the spec says: no server is asked.
        healthy = probe(port, "healthz")
    assert not_ready.status_code == 503
    variable = "POSTGRES_URL" if unreachable != "broker" else "PROTOCOL_BROKER_URL"
    assert not_ready.text.startswith(f"{variable}: ")
    assert "guest:guest" not in not_ready.text
    assert (healthy.status_code, healthy.text) == (200, "I am healthy")


def answers_http(port: int) -> bool:
    try:
        probe(port, "healthz")
    except httpx.TransportError:
        return False
    return True


def test_scraping_does_not_hold_a_transaction_open(database_url, rabbitmq_url, tmp_path):
    """The endpoint's connection is in autocommit: it never holds back vacuum between scrapes."""
    port = free_port()
    environ = driver_environment(database_url, rabbitmq_url, METRICS_PORT=str(port))
    with running(["run", "metrics"], environ, tmp_path), psycopg.connect(database_url, autocommit=True) as watcher:
        wait_for(lambda: answers(port), "the metrics endpoint")
        scrape(port)
        states = watcher.execute(
            "SELECT state FROM pg_stat_activity WHERE application_name = 'pyswpt metrics'"
        ).fetchall()
    assert states == [("idle",)]


def test_the_command_line_does_not_load_prometheus_client_before_the_metrics_directory_is_set():
    # prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is first imported: a module
    # that pyswpt.cli imports at the top and that imports it would make every driver count
    # in its own memory, and `run all` would serve nothing.
    check = "import sys, pyswpt.cli; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
