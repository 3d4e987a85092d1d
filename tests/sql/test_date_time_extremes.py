"""Date-times at the edges of what intake accepts (issue 8, observation 1; spec 01 §1.1).

Each test decodes a message the way the consumer does, passes its date-time
through every SQL step it reaches, then reads and encodes the outbox as the
flusher does. Whatever intake accepts must come out; what it refuses (an
instant outside Python's datetime range once in UTC) never gets that far. The
request's deadline, `ts + max_commit_delay`, must not overflow either.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import psycopg
import pytest
from balance_steps import WHOLE_REALM, process_changes, register_change
from factories import DEFAULT_NOW, insert_account
from psycopg.rows import dict_row
from transfer_steps import (
    DEBTOR_ID,
    MAX_INT32,
    RECIPIENT_ID,
    SENDER_ID,
    deliver_balance_changes,
    enqueue_finalize,
    enqueue_prepare,
    prepared_transfers,
    process_finalizations,
    process_prepares,
)

from pyswpt import config, messages, outbox, wire

CONFIG = config.load({}, now=DEFAULT_NOW)
LATEST = "9999-12-31T23:59:59.999999Z"
T_INFINITY = "9999-12-31T23:59:59+00:00"
EARLIEST = "0001-01-01T00:00:00Z"
# Within Python's range as written, outside it once in UTC: what the reference
# stored and then could not read back.
OUTSIDE_UTC_RANGE = ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00+00:01"]
EDGES = [LATEST, T_INFINITY, EARLIEST, *OUTSIDE_UTC_RANGE]


def intake(message_type: str, kinds: messages.Kinds = messages.SMP_KINDS, **fields: Any) -> Any:
    """The decoded message, or None when intake refuses it."""
    body = json.dumps({"type": message_type, **fields}).encode()
    try:
        return messages.decode(messages.CONTENT_TYPE_JSON, message_type, body, kinds)
    except messages.InvalidMessage:
        return None


def flushed_bodies(conn: psycopg.Connection) -> str:
    """Every outbox row taken, read by psycopg and encoded, as the flusher does; one text."""
    bodies = []
    with conn.cursor(row_factory=dict_row) as cursor:
        for table in outbox.TABLES:
            for row in cursor.execute(table.take_query, {"max_count": 1000}).fetchall():
                bodies.append(wire.smp_body(table.to_fields(row, CONFIG)).decode())
    return "\n".join(bodies)


def wire_text(moment: dt.datetime) -> str:
    return json.dumps(wire.format_datetime(moment))


@pytest.mark.parametrize("text", EDGES)
def test_configure_account_ts_at_the_edges_is_refused_or_flushed(conn, text):
    account_update = intake(
        "ConfigureAccount",
        debtor_id=DEBTOR_ID,
        creditor_id=SENDER_ID,
        negligible_amount=0.0,
        config_data="",
        config_flags=0,
        seqnum=1,
        ts=text,
    )
    if account_update is None:
        assert text in OUTSIDE_UTC_RANGE
        return
    for message in (account_update, dataclasses.replace(account_update, creditor_id=RECIPIENT_ID, config_data="x")):
        conn.execute(
            "SELECT configure_account(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                message.debtor_id,
                message.creditor_id,
                message.ts,
                message.seqnum,
                message.negligible_amount,
                message.config_flags,
                message.config_data,
                CONFIG.message_max_delay_seconds,
                DEFAULT_NOW,
            ),
        )
    flushed = flushed_bodies(conn)
    if account_update.ts > DEFAULT_NOW:
        # An AccountUpdate (last_config_ts) and a RejectedConfig (config_ts) carry it.
        assert flushed.count(wire_text(account_update.ts)) == 2


@pytest.mark.parametrize("text", EDGES)
def test_prepare_and_finalize_transfer_date_times_at_the_edges_are_refused_or_flushed(conn, text):
    prepare = intake(
        "PrepareTransfer",
        debtor_id=DEBTOR_ID,
        creditor_id=SENDER_ID,
        coordinator_type="direct",
        coordinator_id=SENDER_ID,
        coordinator_request_id=1,
        min_locked_amount=100,
        max_locked_amount=100,
        recipient=str(RECIPIENT_ID),
        final_interest_rate_ts=text,
        max_commit_delay=MAX_INT32,
        ts=text,
    )
    if prepare is None:
        assert text in OUTSIDE_UTC_RANGE
        return
    insert_account(conn, DEBTOR_ID, SENDER_ID, principal=1000)
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    enqueue_prepare(
        conn,
        min_locked=prepare.min_locked_amount,
        max_locked=prepare.max_locked_amount,
        final_interest_rate_ts=prepare.final_interest_rate_ts,
        max_commit_delay_seconds=prepare.max_commit_delay,
        ts=prepare.ts,
        reachable=True,
    )
    process_prepares(conn)
    for transfer in prepared_transfers(conn):
        enqueue_finalize(conn, transfer, 100, ts=prepare.ts)
        process_finalizations(conn)
        deliver_balance_changes(conn)
    flushed = flushed_bodies(conn)
    if prepare.final_interest_rate_ts >= DEFAULT_NOW:
        assert wire_text(prepare.final_interest_rate_ts) in flushed
        assert '"type":"FinalizedTransfer"' in flushed and '"status_code":"OK"' in flushed


@pytest.mark.parametrize("text", EDGES)
def test_pending_balance_change_committed_at_the_edges_is_refused_or_flushed(conn, text):
    change = intake(
        "PendingBalanceChange",
        debtor_id=DEBTOR_ID,
        creditor_id=RECIPIENT_ID,
        change_id=1,
        coordinator_type="direct",
        transfer_note_format="",
        transfer_note="",
        committed_at=text,
        principal_delta=100,
        other_creditor_id=SENDER_ID,
    )
    if change is None:
        assert text in OUTSIDE_UTC_RANGE
        return
    insert_account(conn, DEBTOR_ID, RECIPIENT_ID)
    register_change(
        conn,
        DEBTOR_ID,
        RECIPIENT_ID,
        change.principal_delta,
        other_creditor_id=change.other_creditor_id,
        change_id=change.change_id,
        committed_at=change.committed_at,
        threshold=CONFIG.remove_from_archive_threshold_date,
    )
    process_changes(conn, DEBTOR_ID, RECIPIENT_ID)
    # The AccountUpdate of the change, deferred to the accounts scanner.
    conn.execute(
        "SELECT send_account_heartbeats(%s, %s, %s, %s, %s, %s, %s)",
        (
            [DEBTOR_ID],
            [RECIPIENT_ID],
            CONFIG.account_heartbeat_days,
            CONFIG.message_max_delay_days,
            *WHOLE_REALM,
            DEFAULT_NOW,
        ),
    )
    flushed = flushed_bodies(conn)
    if change.committed_at >= CONFIG.remove_from_archive_threshold_date:
        # AccountTransfer.committed_at and AccountUpdate.last_transfer_committed_at.
        assert flushed.count(wire_text(change.committed_at)) == 2
