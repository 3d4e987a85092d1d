"""`pyswpt status` (issue 11): exit 0 with every part in --json for a running node; exit 1 with
the reason for a stuck outbox, parked messages, a queue without consumers, a silent scanner."""

from __future__ import annotations

import json
import subprocess

from drivers import node_environment, pyswpt_command, running, wait_for  # noqa: F401
from factories import insert_account

from pyswpt import config as settings
from pyswpt import status, topology
from pyswpt.parking import SOURCE_QUEUE, Parcel, park

OUTBOX_TABLES = {
    "rejected_transfer_signal",
    "prepared_transfer_signal",
    "finalized_transfer_signal",
    "account_transfer_signal",
    "account_update_signal",
    "account_purge_signal",
    "rejected_config_signal",
    "pending_balance_change_signal",
}
STAGES = {"transfer_request", "finalization_request", "pending_balance_change"}
# A node on this small shared machine takes a while to start its six drivers.
NODE_START_SECONDS = 90.0


def run_status(environ: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pyswpt_command(), "status", *options], env=environ, capture_output=True, text=True, timeout=60
    )


def reasons(environ: dict[str, str], **settings_: str) -> list[str]:
    """What makes the node unhealthy, read in this process."""
    return status.collect(settings.load({**environ, **settings_})).reasons


def matching(found: list[str], start: str) -> list[str]:
    return [reason for reason in found if reason.startswith(start)]


def test_a_running_node_is_healthy_with_every_part_in_json(node_environment, tmp_path):  # noqa: F811
    _, environ = node_environment
    with running(["run", "all"], environ, tmp_path):
        wait_for(lambda: run_status(environ).returncode == 0, "a healthy status", NODE_START_SECONDS)
        result = run_status(environ, "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout)
    assert (found["healthy"], found["reasons"]) == (True, [])
    assert found["schema"]["pending"] == [] and found["schema"]["applied"] == found["schema"]["migrations"]
    assert [(queue["queue"], queue["exists"]) for queue in found["queues"]] == [
        (environ["PROTOCOL_BROKER_QUEUE"], True),
        (environ["CHORES_BROKER_QUEUE"], True),
    ]
    assert all(queue["consumers"] >= 1 for queue in found["queues"])
    assert {row["outbox_table"] for row in found["outbox"]} == OUTBOX_TABLES
    assert {row["stage"] for row in found["work_queues"]} == STAGES
    assert found["parked"] == []
    assert {row["table_name"] for row in found["scanners"]} == set(status.SCANNED_TABLES)
    assert all(row["recorded_age"] < 60 for row in found["scanners"])


def test_a_stuck_outbox_makes_the_node_unhealthy(conn, node_environment):  # noqa: F811
    _, environ = node_environment
    conn.execute("SELECT lock_or_create_account(7, 1, now() - interval '10 minutes')")
    conn.execute("SELECT lock_or_create_account(7, 2, now())")

    assert matching(reasons(environ), "outbox") == [
        "outbox account_update_signal: 2 AccountUpdate messages unsent, the oldest for 10 min, longer than "
        "APP_STATUS_MAX_OUTBOX_AGE_SECONDS=300 (is the flusher running, and the broker taking them?)"
    ]
    assert matching(reasons(environ, APP_STATUS_MAX_OUTBOX_AGE_SECONDS="900"), "outbox") == []


def test_parked_messages_make_the_node_unhealthy(conn, node_environment):  # noqa: F811
    _, environ = node_environment
    for routing_key in ("1.0", "1.1"):
        park(
            conn,
            Parcel(
                source_kind=SOURCE_QUEUE,
                source_name="swpt_accounts",
                routing_key=routing_key,
                reason_code="invalid",
                reason="no such message type",
                body=b"{}",
            ),
        )

    assert matching(reasons(environ), "parked") == [
        "parked: 2 messages (swpt_accounts invalid: 2); see pyswpt parked list"
    ]
    assert matching(reasons(environ, APP_STATUS_MAX_PARKED_MESSAGES="2"), "parked") == []


def test_a_queue_without_consumers_makes_the_node_unhealthy(conn, node_environment, rabbitmq_url):  # noqa: F811
    _, environ = node_environment
    queue = environ["PROTOCOL_BROKER_QUEUE"]

    result = run_status(environ)
    assert result.returncode == status.EXIT_UNHEALTHY
    assert f"! queue {queue}: no consumer (is the node running?)" in result.stdout

    with topology.open_channel(rabbitmq_url) as channel:
        channel.basic_consume(queue, lambda *_: None)
        assert matching(reasons(environ), f"queue {queue}:") == []


def test_a_missing_queue_makes_the_node_unhealthy(conn, node_environment):  # noqa: F811
    _, environ = node_environment
    found = reasons(environ, PROTOCOL_BROKER_QUEUE="test_status_no_such_queue")
    assert "queue test_status_no_such_queue: does not exist (run pyswpt configure, or pyswpt subscribe)" in found


def test_a_silent_scanner_makes_the_node_unhealthy(conn, node_environment):  # noqa: F811
    _, environ = node_environment
    for table_name in status.SCANNED_TABLES:
        conn.execute(
            "SELECT record_scan_pass_start(p_table_name => %s, p_pass_seconds => 60, p_row_estimate => 0)",
            (table_name,),
        )
    conn.execute("UPDATE scan_pass SET recorded_at = now() - interval '1 hour' WHERE table_name = 'account'")

    assert matching(reasons(environ), "scanner") == [
        "scanner account: silent for 60 min, longer than APP_STATUS_MAX_SCANNER_SILENCE_SECONDS=600 (is it running?)"
    ]


def test_a_scanner_that_never_ran_makes_the_node_unhealthy(conn, node_environment):  # noqa: F811
    _, environ = node_environment
    assert matching(reasons(environ), "scanner") == [
        f"scanner {table_name}: has never run" for table_name in status.SCANNED_TABLES
    ]


def test_a_full_work_queue_makes_the_node_unhealthy(conn, node_environment):  # noqa: F811
    _, environ = node_environment
    insert_account(conn, 7, 1)
    conn.execute(
        "SELECT register_balance_change(p_debtor_id => 7, p_other_creditor_id => 2, p_change_id => 1, "
        "p_creditor_id => 1, p_coordinator_type => 'direct', p_transfer_note_format => '', p_transfer_note => '', "
        "p_committed_at => now() - interval '1 hour', p_principal_delta => 5, p_archive_threshold => 'epoch')"
    )

    assert matching(reasons(environ), "work queue") == [
        "work queue pending_balance_change: the oldest request is 60 min old, more than "
        "APP_STATUS_MAX_WORK_QUEUE_AGE_SECONDS=900 (are the workers running?)"
    ]
    assert matching(reasons(environ, APP_STATUS_MAX_WORK_QUEUE_ROWS="0"), "work queue pending_balance_change: 1") == [
        "work queue pending_balance_change: 1 requests, more than APP_STATUS_MAX_WORK_QUEUE_ROWS=0 "
        "(are the workers running?)"
    ]


def test_an_unreachable_database_is_a_reason_and_the_broker_parts_are_still_shown(node_environment):  # noqa: F811
    _, environ = node_environment
    environ = {**environ, "POSTGRES_URL": "postgresql://nobody@127.0.0.1:1/nowhere?connect_timeout=2"}
    result = run_status(environ, "--json")
    assert result.returncode == status.EXIT_UNHEALTHY
    found = json.loads(result.stdout)
    assert any(reason.startswith("database: cannot connect") for reason in found["reasons"])
    assert any(reason.startswith("schema: cannot read it") for reason in found["reasons"])
    assert found["queues"][0]["exists"] is True
