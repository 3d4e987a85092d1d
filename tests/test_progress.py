"""Progress of the long operator commands (issue 11): lines on stderr when it is not a terminal.

APP_PROGRESS_INTERVAL_SECONDS=0 prints a line at every step, so that a test
sees several without a long run; by default (10 s) a command that ends sooner
prints none.
"""

from __future__ import annotations

import io
import json
import re
import subprocess

import pytest
from drivers import driver_environment, pyswpt_command

from pyswpt import progress
from pyswpt.parking import SOURCE_QUEUE, Parcel, park
from pyswpt.shard_content import BLOCKS_PER_QUERY

# Enough accounts (and their AccountUpdate rows) for several block ranges of verify-shard-content.
ACCOUNT_COUNT = 4000
PROGRESS_LINE = re.compile(r"^(?P<what>[\w -]+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<percent>\d+)%\), ")


def run(database_url: str, rabbitmq_url: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    environ = driver_environment(database_url, rabbitmq_url, **settings)
    return subprocess.run([*pyswpt_command(), *args], env=environ, capture_output=True, text=True, timeout=120)


def progress_lines(stderr: str, what: str) -> list[tuple[int, int, str]]:
    """(done, total, unit) of each progress line of `what`."""
    found = [PROGRESS_LINE.match(line) for line in stderr.splitlines()]
    return [(int(m["done"]), int(m["total"]), m["unit"]) for m in found if m and m["what"] == what]


def assert_progress_to_the_end(lines: list[tuple[int, int, str]], unit: str) -> None:
    assert len(lines) >= 2
    done = [line[0] for line in lines]
    assert done == sorted(done) and done[0] < done[-1]
    total = lines[0][1]
    assert all(line[1:] == (total, unit) for line in lines)
    assert done[-1] == total


@pytest.fixture
def many_accounts(conn):
    conn.execute("SELECT lock_or_create_account(7, g, now()) FROM generate_series(1, %s) AS g", (ACCOUNT_COUNT,))
    conn.execute("ANALYZE")


def test_verify_shard_content_prints_progress_lines_in_blocks(many_accounts, database_url, rabbitmq_url):
    result = run(database_url, rabbitmq_url, "verify-shard-content", APP_PROGRESS_INTERVAL_SECONDS="0")

    assert result.returncode == 0, result.stdout + result.stderr
    lines = progress_lines(result.stderr, "verify-shard-content")
    assert_progress_to_the_end(lines, "blocks")
    assert lines[0][1] > 2 * BLOCKS_PER_QUERY


def test_audit_prints_progress_lines_in_blocks_and_keeps_stdout_for_its_json(many_accounts, database_url, rabbitmq_url):
    result = run(database_url, rabbitmq_url, "audit", "--json", APP_PROGRESS_INTERVAL_SECONDS="0")

    assert result.returncode == 0, result.stdout + result.stderr
    assert_progress_to_the_end(progress_lines(result.stderr, "audit"), "blocks")
    assert {check["status"] for check in json.loads(result.stdout)["checks"]} <= {"ok", "info"}


def test_a_command_shorter_than_the_interval_prints_no_progress(conn, database_url, rabbitmq_url):
    result = run(database_url, rabbitmq_url, "verify-shard-content")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""


def test_parked_discard_prints_progress_lines_in_messages(conn, database_url, rabbitmq_url):
    for routing_key in ("1.0", "1.1"):
        parcel = Parcel(
            source_kind=SOURCE_QUEUE,
            source_name="swpt_accounts",
            routing_key=routing_key,
            reason_code="invalid",
            reason="no such message type",
            body=b"{}",
        )
        park(conn, parcel)

    result = run(
        database_url,
        rabbitmq_url,
        "parked",
        "discard",
        "--all-with-reason",
        "invalid",
        APP_PROGRESS_INTERVAL_SECONDS="0",
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert progress_lines(result.stderr, "parked discard") == [(2, 2, "messages")]


def test_delete_queue_progress_counts_the_messages_that_left_the_queue():
    stream = io.StringIO()
    with progress.track("delete-queue q", 0, " messages", 0.0, stream) as shown:
        drain = progress.Drain(shown)
        for message_count in (5, 3, 0):
            drain(message_count)

    assert progress_lines(stream.getvalue(), "delete-queue q") == [
        (0, 5, "messages"),
        (2, 5, "messages"),
        (5, 5, "messages"),
    ]
