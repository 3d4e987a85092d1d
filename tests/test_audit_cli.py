"""`pyswpt audit` (issue 8): a table of the ledger's checks; exit 1 on any violation,
0 otherwise (warnings and information included)."""

from __future__ import annotations

import json
import subprocess

from drivers import driver_environment, pyswpt_command
from factories import DEFAULT_NOW

from pyswpt.parking import SOURCE_QUEUE, Parcel, park

DEBTOR_ID = -2
CREDITOR_ID = 1234


def run_audit(
    database_url: str, rabbitmq_url: str, *options: str, routing_key: str = "#"
) -> subprocess.CompletedProcess[str]:
    environ = driver_environment(database_url, rabbitmq_url, PROTOCOL_BROKER_QUEUE_ROUTING_KEY=routing_key)
    return subprocess.run(
        [*pyswpt_command(), "audit", *options], env=environ, capture_output=True, text=True, timeout=60
    )


def status_of(output: str, check_name: str) -> str:
    """The status column of one check's line in the table."""
    (line,) = [line for line in output.splitlines() if line.split()[:1] == [check_name]]
    return line.split()[1]


def pay(conn, amount: int) -> None:
    """A debtor payment: the creditor's principal changes now, the root's change waits in the outbox."""
    conn.execute(
        "SELECT make_direct_debtor_payment('test', %s, %s, %s, '', '', %s)",
        (DEBTOR_ID, CREDITOR_ID, amount, DEFAULT_NOW),
    )


def test_empty_ledger_audits_clean(conn, database_url, rabbitmq_url):
    result = run_audit(database_url, rabbitmq_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].split() == ["check", "status", "count", "first", "found"]
    assert status_of(result.stdout, "locked_amounts") == "ok"
    assert "VIOLATION" not in result.stdout


def test_money_in_transit_is_information_and_exits_0(conn, database_url, rabbitmq_url):
    pay(conn, 100)
    result = run_audit(database_url, rabbitmq_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert status_of(result.stdout, "money_in_transit") == "info"
    assert status_of(result.stdout, "conservation") == "ok"


def test_wrong_total_locked_amount_exits_1_and_names_the_check_and_account(conn, database_url, rabbitmq_url):
    pay(conn, 100)
    conn.execute("UPDATE account SET total_locked_amount = 5 WHERE creditor_id = %s", (CREDITOR_ID,))
    result = run_audit(database_url, rabbitmq_url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert status_of(result.stdout, "locked_amounts") == "VIOLATION"
    assert f"({DEBTOR_ID}, {CREDITOR_ID}) total_locked_amount 5, prepared 0" in result.stdout


def test_conservation_is_a_violation_only_for_a_shard_holding_every_account(conn, database_url, rabbitmq_url):
    pay(conn, 100)
    conn.execute("DELETE FROM pending_balance_change_signal")
    whole = run_audit(database_url, rabbitmq_url, routing_key="#")
    assert whole.returncode == 1
    assert status_of(whole.stdout, "conservation") == "VIOLATION"
    half = run_audit(database_url, rabbitmq_url, routing_key="0.#")
    assert half.returncode == 0, half.stdout + half.stderr
    assert status_of(half.stdout, "conservation") == "info"


def test_parked_balance_change_is_a_warning_that_restores_the_in_transit_figure(conn, database_url, rabbitmq_url):
    pay(conn, 100)
    conn.execute("DELETE FROM pending_balance_change_signal")
    body = json.dumps({"debtor_id": DEBTOR_ID, "creditor_id": 0, "principal_delta": -100}).encode()
    park(
        conn,
        Parcel(
            source_kind=SOURCE_QUEUE,
            source_name="swpt_accounts",
            routing_key="1.0",
            reason_code="refused",
            reason="refused by the database",
            body=body,
            message_type="PendingBalanceChange",
            debtor_id=DEBTOR_ID,
        ),
    )
    result = run_audit(database_url, rabbitmq_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert status_of(result.stdout, "conservation") == "ok"
    assert status_of(result.stdout, "money_in_transit") == "warning"
    assert status_of(result.stdout, "parked_messages") == "warning"
    assert f"debtor {DEBTOR_ID}: -100 (unsent 0, queued 0, parked -100)" in result.stdout


def test_json_output_lists_every_check(conn, database_url, rabbitmq_url):
    conn.execute("SELECT lock_or_create_account(%s, %s, %s)", (DEBTOR_ID, CREDITOR_ID, DEFAULT_NOW))
    conn.execute("UPDATE account SET pending_transfers_count = 2")
    result = run_audit(database_url, rabbitmq_url, "--json")
    assert result.returncode == 1
    checks = {check["check_name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["pending_transfer_counts"]["status"] == "VIOLATION"
    assert checks["pending_transfer_counts"]["found_count"] == 1
    assert checks["locked_amounts"] == {
        "check_name": "locked_amounts",
        "status": "ok",
        "found_count": 0,
        "first_keys": [],
        "detail": "total_locked_amount = Σ locked_amount of the account's prepared transfers",
    }
