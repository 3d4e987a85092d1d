"""`pyswpt verify-shard-content` (spec 01 §4.5): exit 0 when every record belongs to the
shard, 1 with the operator's log line at the first one that does not."""

from __future__ import annotations

import subprocess

from drivers import driver_environment, pyswpt_command
from factories import DEFAULT_NOW, insert_account

FOREIGN_RECORD_FOUND = "At least one record has been found that does not belong to the shard."
# Spec 01 §4.2: (-1, 1234) is in 0.#, not in 1.#; (-1, 12) is in 1.#.
IN_0 = (-1, 1234)
IN_1 = (-1, 12)


def verify(database_url: str, rabbitmq_url: str, routing_key: str) -> subprocess.CompletedProcess[str]:
    environ = driver_environment(database_url, rabbitmq_url, PROTOCOL_BROKER_QUEUE_ROUTING_KEY=routing_key)
    return subprocess.run(
        [*pyswpt_command(), "verify-shard-content"], env=environ, capture_output=True, text=True, timeout=60
    )


def test_account_of_the_shard_passes(conn, database_url, rabbitmq_url):
    insert_account(conn, *IN_0)
    result = verify(database_url, rabbitmq_url, "0.#")
    assert result.returncode == 0, result.stdout + result.stderr
    assert FOREIGN_RECORD_FOUND not in result.stdout


def test_account_of_another_shard_fails_with_the_log_line(conn, database_url, rabbitmq_url):
    insert_account(conn, *IN_0)
    result = verify(database_url, rabbitmq_url, "1.#")
    assert result.returncode == 1
    assert FOREIGN_RECORD_FOUND in result.stdout
    assert "account (-1, 1234)" in result.stdout


def test_empty_database_passes(conn, database_url, rabbitmq_url):
    assert verify(database_url, rabbitmq_url, "1.0.1.#").returncode == 0


def test_outbox_row_of_another_shard_fails(conn, database_url, rabbitmq_url):
    # Creating an account writes its AccountUpdate; only that outbox row is left.
    conn.execute("SELECT lock_or_create_account(%s, %s, %s)", (*IN_0, DEFAULT_NOW))
    conn.execute("DELETE FROM account")
    result = verify(database_url, rabbitmq_url, "1.#")
    assert result.returncode == 1
    assert "table account_update_signal" in result.stdout


def emit_payment(conn, debtor_id: int, sender_creditor_id: int, recipient_creditor_id: int) -> None:
    conn.execute(
        "SELECT emit_pending_balance_change(%s, %s, %s, 'direct', '', '', %s, 5, %s)",
        (debtor_id, sender_creditor_id, recipient_creditor_id, DEFAULT_NOW, DEFAULT_NOW),
    )


def test_payment_to_another_shard_waiting_in_the_outbox_passes(conn, database_url, rabbitmq_url):
    # The reference checks the recipient here and fails (a quirk); the sender is what
    # belongs to this shard.
    emit_payment(conn, IN_0[0], sender_creditor_id=IN_0[1], recipient_creditor_id=IN_1[1])
    assert verify(database_url, rabbitmq_url, "0.#").returncode == 0


def test_payment_from_an_account_of_another_shard_fails(conn, database_url, rabbitmq_url):
    emit_payment(conn, IN_1[0], sender_creditor_id=IN_1[1], recipient_creditor_id=IN_0[1])
    result = verify(database_url, rabbitmq_url, "0.#")
    assert result.returncode == 1
    assert "table pending_balance_change_signal" in result.stdout


def test_record_beyond_the_first_block_ranges_is_found(conn, database_url, rabbitmq_url):
    # About 4000 accounts of shard 0.# fill well over one query's 64 heap blocks.
    conn.execute(
        "SELECT lock_or_create_account(-1, g, %s) FROM generate_series(1, 8000) AS g"
        " WHERE is_in_realm(-1, g, x'80000000'::bigint, 0)",
        (DEFAULT_NOW,),
    )
    assert conn.execute("SELECT pg_relation_size('account') / 8192").fetchone()[0] > 64
    assert verify(database_url, rabbitmq_url, "0.#").returncode == 0
    insert_account(conn, *IN_1)
    assert verify(database_url, rabbitmq_url, "0.#").returncode == 1


def park(conn, source_kind: str, source_name: str, pair: tuple[int, int] | tuple[None, None], body: bytes) -> None:
    conn.execute(
        "SELECT park_message("
        "p_source_kind => %s, p_source_name => %s, p_exchange => 'accounts_in', p_routing_key => '',"
        " p_message_type => 'PendingBalanceChange', p_content_type => 'application/json', p_headers => NULL,"
        " p_body => %s, p_row_data => NULL, p_debtor_id => %s, p_creditor_id => %s, p_reason_code => 'refused',"
        " p_reason => 'test', p_sqlstate => NULL, p_attempts => 1, p_next_retry_at => NULL,"
        " p_max_per_reason => 100)",
        (source_kind, source_name, body, *pair),
    )


def test_parked_message_of_another_shard_fails(conn, database_url, rabbitmq_url):
    park(conn, "queue", "swpt_accounts", IN_1, b'{"type": "PendingBalanceChange"}')
    result = verify(database_url, rabbitmq_url, "0.#")
    assert result.returncode == 1
    assert "table parked_message, account (-1, 12)" in result.stdout


def test_parked_outgoing_payment_belongs_to_its_sender_not_to_its_recipient(conn, database_url, rabbitmq_url):
    body = b'{"type": "PendingBalanceChange", "other_creditor_id": 1234, "creditor_id": 12}'
    park(conn, "outbox", "pending_balance_changes", IN_1, body)  # parked with the recipient's pair
    assert verify(database_url, rabbitmq_url, "0.#").returncode == 0
    assert verify(database_url, rabbitmq_url, "1.#").returncode == 1


def test_parked_message_that_names_no_account_is_not_checked(conn, database_url, rabbitmq_url):
    park(conn, "queue", "swpt_accounts", (None, None), b"\xff not JSON")
    park(conn, "outbox", "pending_balance_changes", (IN_1[0], None), b"\xff not JSON")
    assert verify(database_url, rabbitmq_url, "1.0.1.#").returncode == 0
