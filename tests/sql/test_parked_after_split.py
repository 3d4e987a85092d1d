"""After a shard split, with DELETE_PARENT_SHARD_RECORDS: the sibling's parked messages are forgotten."""

from __future__ import annotations

# Spec 01 §4.2: (-1, 1234) is in 0.#, not in 1.#; (-1, 12) is in 1.#; both are in the parent `#`.
IN_0 = (-1, 1234)
IN_1 = (-1, 12)
# 0.1.# and its parent 0.#: (1, 3) is in 0.1.#, (123, 456) in 0.0.#, (1, 2) in 1.# (neither).
IN_01 = (1, 3)
IN_00 = (123, 456)
IN_NEITHER = (1, 2)


def park(conn, pair, *, source_kind="queue", source_name="swpt_accounts", body=b"{}") -> int:
    return conn.execute(
        "SELECT park_message("
        "p_source_kind => %s, p_source_name => %s, p_exchange => 'accounts_in', p_routing_key => %s,"
        " p_message_type => 'PrepareTransfer', p_content_type => 'application/json', p_headers => NULL,"
        " p_body => %s, p_row_data => NULL, p_debtor_id => %s, p_creditor_id => %s, p_reason_code => 'refused',"
        " p_reason => 'test', p_sqlstate => NULL, p_attempts => 1, p_next_retry_at => NULL,"
        " p_max_per_reason => 100)",
        (source_kind, source_name, str(pair), body, *pair),
    ).fetchone()[0]


def delete_siblings(conn, realm_mask, realm, parent_mask, parent_realm, max_count=100) -> int:
    return conn.execute(
        "SELECT delete_parent_shard_parked_messages(%s, %s, %s, %s, %s)",
        (realm_mask, realm, parent_mask, parent_realm, max_count),
    ).fetchone()[0]


def parked_pairs(conn) -> list[tuple]:
    return conn.execute("SELECT debtor_id, creditor_id FROM parked_message ORDER BY parked_id").fetchall()


def test_the_child_0_forgets_the_parked_messages_of_child_1_and_keeps_its_own(conn):
    park(conn, IN_0)
    park(conn, IN_1)
    park(conn, (None, None), body=b"not JSON")

    assert delete_siblings(conn, 0x80000000, 0, 0, 0) == 1

    assert parked_pairs(conn) == [IN_0, (None, None)]


def test_messages_outside_the_parent_realm_are_kept(conn):
    for pair in (IN_01, IN_00, IN_NEITHER):
        park(conn, pair)

    assert delete_siblings(conn, 0xC0000000, 0x40000000, 0x80000000, 0) == 1

    assert parked_pairs(conn) == [IN_01, IN_NEITHER]


def test_a_parked_outgoing_payment_goes_with_its_sender(conn):
    # Parked with its recipient's pair (in 0.#); its sender (-1, 12) is in 1.#.
    body = b'{"type": "PendingBalanceChange", "other_creditor_id": 12, "creditor_id": 1234}'
    park(conn, IN_0, source_kind="outbox", source_name="pending_balance_changes", body=body)

    assert delete_siblings(conn, 0x80000000, 0x80000000, 0, 0) == 0
    assert delete_siblings(conn, 0x80000000, 0, 0, 0) == 1


def test_at_most_max_count_are_forgotten_per_call(conn):
    for creditor_id in range(100, 160):
        park(conn, (-1, creditor_id))
    siblings = conn.execute(
        "SELECT count(*) FROM parked_message WHERE is_in_realm(debtor_id, creditor_id, x'80000000'::bigint, 0)"
    ).fetchone()[0]

    assert delete_siblings(conn, 0x80000000, 0x80000000, 0, 0, max_count=5) == 5
    assert conn.execute("SELECT count(*) FROM parked_message").fetchone()[0] == 60 - 5
    assert siblings > 5  # the sibling has more: the call stopped at max_count
