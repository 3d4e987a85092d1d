"""`pyswpt parked`: list, show, replay and discard parked messages (issue 8).

A replay publishes the message again and forgets its row in one database
transaction: the rows are locked, published with publisher confirms, and
discarded only after the broker took them, then the transaction commits. A
crash between the confirm and the commit replays a message twice, never
loses one. A consumed message goes back the way it came, normally
`accounts_in` with its original routing key, so the shard that owns it gets
it, and a PendingBalanceChange replayed twice is applied once (the archive of
registered balance changes).
An outgoing message goes to the exchange it was meant for.

Exit statuses: 0 when everything asked for was done, 1 when some message was
not found or could not be replayed (one line each on stderr).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pika
import psycopg
from psycopg.rows import dict_row

from pyswpt import amqp, db, parking, progress, queries, wire
from pyswpt.config import Config
from pyswpt.transactions import with_retries

EXIT_DONE = 0
EXIT_SOME_LEFT = 1

LIST_PAGE_SIZE = 500
# Messages per transaction and per broker round.
ACTION_BATCH_SIZE = 100
REFUSAL_OF_OUTCOME = {
    amqp.Outcome.RETURNED: "returned: no queue is bound for it",
    amqp.Outcome.NACKED: "nacked",
}


Row = dict[str, Any]
# Acts on one batch of locked rows in the caller's transaction: returns the
# ids done (to be discarded) and a line for each row kept.
BatchAction = Callable[[list[Row]], tuple[list[int], list[str]]]


def connect(config: Config) -> psycopg.Connection[Row]:
    """A connection whose rows are dicts: the commands print columns by name."""
    conn = db.connect(config.operator_postgres_url, application_name="pyswpt parked")
    conn.row_factory = dict_row
    return conn


def list_parked(config: Config, reason_code: str | None, source_name: str | None, as_json: bool) -> int:
    """Print the parked messages, oldest first: a table, or one JSON object per line."""
    with connect(config) as conn:
        if not as_json:
            print(list_line(LIST_HEADINGS))
        for row in parked_rows(conn, reason_code, source_name):
            print(json.dumps(row, default=json_value) if as_json else list_line(row))
    return EXIT_DONE


LIST_HEADINGS = {
    "parked_id": "ID",
    "source_name": "SOURCE",
    "message_type": "TYPE",
    "debtor_id": "DEBTOR",
    "creditor_id": "CREDITOR",
    "reason_code": "REASON_CODE",
    "attempts": "ATTEMPTS",
    "last_seen_at": "LAST_SEEN",
    "reason": "REASON",
}


def list_line(row: Row) -> str:
    last_seen = row["last_seen_at"]
    if isinstance(last_seen, dt.datetime):
        last_seen = last_seen.isoformat(timespec="seconds")
    return (
        f"{row['parked_id']:>8} {row['source_name']:<24} {row['message_type'] or '-':<22}"
        f" {row['debtor_id'] if row['debtor_id'] is not None else '-':>20}"
        f" {row['creditor_id'] if row['creditor_id'] is not None else '-':>20}"
        f" {row['reason_code']:<16} {row['attempts']:>8} {last_seen:<25} {row['reason']}"
    )


def parked_rows(conn: psycopg.Connection, reason_code: str | None, source_name: str | None) -> Iterator[Row]:
    """Every parked message (no bodies) with this reason and source, page by page in id order."""
    after_id = 0
    while True:
        params = {"after_id": after_id, "max_count": LIST_PAGE_SIZE}
        page = with_retries(conn, lambda c, params=params: c.execute(queries.LIST_PARKED_MESSAGES, params).fetchall())
        for row in page:
            if reason_code in (None, row["reason_code"]) and source_name in (None, row["source_name"]):
                yield row
        if len(page) < LIST_PAGE_SIZE:
            return
        after_id = page[-1]["parked_id"]


def show_parked(config: Config, parked_id: int) -> int:
    """Print every column of one parked message; the body as text when it is UTF-8 JSON, else in hex."""
    with connect(config) as conn:
        params = {"parked_id": parked_id}
        row = with_retries(conn, lambda c: c.execute(queries.GET_PARKED_MESSAGE, params).fetchone())
    if row is None:
        print(f"parked message {parked_id}: not found", file=sys.stderr)
        return EXIT_SOME_LEFT
    for name, value in row.items():
        print(f"{name}: {shown_value(name, value)}")
    return EXIT_DONE


def shown_value(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "body":
        return body_text(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def body_text(body: bytes) -> str:
    try:
        text = body.decode("utf-8")
        json.loads(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"({len(body)} bytes, not UTF-8 JSON, in hex) {body.hex()}"
    return text


def replay_parked(config: Config, parked_ids: Sequence[int], reason_code: str | None) -> int:
    """Publish the parked messages again and discard those the broker took."""
    publisher = amqp.BatchPublisher(config.protocol_broker_url)
    try:
        return act_on_parked(
            config, parked_ids, reason_code, "replay", "Replayed", lambda rows: replay(publisher, rows)
        )
    finally:
        publisher.close()


def discard_parked(config: Config, parked_ids: Sequence[int], reason_code: str | None) -> int:
    """Forget the parked messages."""
    return act_on_parked(
        config, parked_ids, reason_code, "discard", "Discarded", lambda rows: ([row["parked_id"] for row in rows], [])
    )


def act_on_parked(
    config: Config,
    parked_ids: Sequence[int],
    reason_code: str | None,
    command: str,
    done: str,
    action: BatchAction,
) -> int:
    """Lock each batch, act on it, discard the rows done, commit; report what was left and why."""
    with connect(config) as conn:
        chosen = chosen_ids(conn, parked_ids, reason_code)
        shown = progress.track(f"parked {command}", len(chosen), " messages", config.progress_interval_seconds)
        with shown as messages_done:
            done_count, problems_count = act_on_batches(conn, chosen, action, messages_done)
    print(f"{done} {done_count} parked messages.")
    return EXIT_SOME_LEFT if problems_count else EXIT_DONE


def act_on_batches(
    conn: psycopg.Connection, chosen: list[int], action: BatchAction, messages_done: progress.Progress
) -> tuple[int, int]:
    """act_on_parked's batches, one transaction each; how many rows were done, and how many were not."""
    done_count = 0
    problems_count = 0
    for start in range(0, len(chosen), ACTION_BATCH_SIZE):
        batch = chosen[start : start + ACTION_BATCH_SIZE]
        with conn.transaction():
            rows = conn.execute(queries.LOCK_PARKED_MESSAGES, {"parked_ids": batch}).fetchall()
            done_ids, problems = action(rows)
            params = {"parked_ids": done_ids}
            discarded = conn.execute(queries.DISCARD_PARKED_MESSAGES, params).fetchone()["discarded_count"]
            assert discarded == len(done_ids), "locked rows cannot vanish before the commit"
        problems = missing(batch, rows) + problems
        for line in problems:
            print(line, file=sys.stderr)
        done_count += discarded
        problems_count += len(problems)
        messages_done.update(len(batch))
    return done_count, problems_count


def chosen_ids(conn: psycopg.Connection, parked_ids: Sequence[int], reason_code: str | None) -> list[int]:
    """The ids asked for, or every id parked with `reason_code` when the command starts.

    Taken before the first batch: a replayed message refused and parked again
    while the command runs gets a new id, which must not be replayed in a loop.
    """
    if reason_code is None:
        return list(dict.fromkeys(parked_ids))
    return [row["parked_id"] for row in parked_rows(conn, reason_code, None)]


def missing(batch: list[int], rows: list[Row]) -> list[str]:
    locked = {row["parked_id"] for row in rows}
    return [
        f"parked message {parked_id}: not found, or locked by another transaction (a replay or flusher retry)"
        for parked_id in batch
        if parked_id not in locked
    ]


def replay(publisher: amqp.BatchPublisher, rows: list[Row]) -> tuple[list[int], list[str]]:
    """Publish the replayable rows; return the ids the broker took and a line for each row kept."""
    problems = []
    replayable = []
    for row in rows:
        why = unreplayable(row)
        if why is None:
            replayable.append(row)
        else:
            problems.append(f"parked message {row['parked_id']}: {why}, kept")
    refusals = refused_by_broker(publisher, [outgoing_message(row) for row in replayable])
    taken_ids = []
    for row, refusal in zip(replayable, refusals, strict=True):
        if refusal is None:
            taken_ids.append(row["parked_id"])
        else:
            problems.append(f"parked message {row['parked_id']}: the broker did not take it ({refusal}), kept")
    return taken_ids, problems


def unreplayable(row: Row) -> str | None:
    """Why a parked row cannot be published again, or None."""
    if row["body"] is None:
        return "has no body (only the outbox row's columns) and cannot be replayed"
    if row["source_kind"] == parking.SOURCE_OUTBOX and row["exchange"] is None:
        return "has no exchange to be replayed to"
    return None


def refused_by_broker(publisher: amqp.BatchPublisher, messages: list[amqp.OutgoingMessage]) -> list[str | None]:
    """Publish `messages`; for each one, None if the broker took it, else why not."""
    if not messages:
        return []
    return [
        None if outcome is amqp.Outcome.CONFIRMED else REFUSAL_OF_OUTCOME[outcome]
        for outcome in publisher.publish_each(messages)
    ]


def outgoing_message(row: Row) -> amqp.OutgoingMessage:
    """The parked message as it is replayed: the way it came (or was going), with its routing key.

    A consumed SMP message came through accounts_in, so the shard that owns
    it gets it again; one that was put straight into a queue (a chore, say)
    goes back through the default exchange to that queue.
    """
    if row["source_kind"] == parking.SOURCE_QUEUE:
        exchange = wire.ACCOUNTS_IN_EXCHANGE if row["exchange"] is None else row["exchange"]
        app_id = None
    else:
        # Every outgoing SMP message names this service (spec 01 §3.1).
        exchange, app_id = row["exchange"], wire.APP_ID
    return amqp.OutgoingMessage(
        exchange=exchange,
        routing_key=row["routing_key"],
        body=row["body"],
        properties=pika.BasicProperties(
            content_type=row["content_type"],
            type=row["message_type"],
            delivery_mode=wire.PERSISTENT_DELIVERY_MODE,
            app_id=app_id,
            headers=amqp.without_broker_headers(row["headers"]),
        ),
        mandatory=True,
    )


def json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")
