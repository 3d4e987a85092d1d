"""Simulated SMP peers around one shard under test, shared by the end-to-end tests.

A `Shard` is one database, one SMP queue bound only to the accounts a test
names, and a random debtor id. The test publishes what peers (creditors,
coordinators, other shards) would send straight into the queue, and an
`Inbox` catches what pyswpt sends on `to_creditors`, `to_debtors`,
`to_coordinators` (through its bindings) and `accounts_in`.

Only the accounts a test names are bound (no `#`): the broker is shared with
other test runs, and a stranger's message in this queue could create an
account whose updates nobody routes, holding back this test's flusher.

An inbox is *strict* by default: `take(n)` returns exactly the next n
messages, so a test proves that nothing else was sent. Under `pyswpt run all`
the scanners send heartbeats and pending AccountUpdates whenever they pass
by, so a *relaxed* inbox keeps every message and `expect()` picks the ones
that match, leaving the rest for later assertions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from broker import Received
from drivers import Running, driver_environment, pyswpt_command, running, wait_for
from pika.adapters.blocking_connection import BlockingChannel
from psycopg.rows import dict_row

from pyswpt import topology
from pyswpt.sharding import Realm, binary_routing_key, hex_routing_key, shard_key, u64_string

UTC = dt.UTC
JSON = "application/json"
T0 = "1970-01-01T00:00:00+00:00"
T_INFINITY = "9999-12-31T23:59:59+00:00"
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
COMMIT_PERIOD_SECONDS = 7776000  # APP_PREPARED_TRANSFER_MAX_DELAY_DAYS = 90
TTL_SECONDS = 604800  # APP_MESSAGE_MAX_DELAY_DAYS = 7
MAX_COMMIT_DELAY_SECONDS = 3600
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.05
# Spec 01 §2.1: `T`, microseconds only when not zero, always `+00:00`.
WIRE_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?\+00:00")
CLOCK_SLACK = dt.timedelta(seconds=2)

DRIVER_SETTINGS = {
    "PROTOCOL_BROKER_QUEUE_ROUTING_KEY": "#",
    "PROTOCOL_BROKER_PREFETCH_COUNT": "50",
    "FLUSH_PERIOD": "0.2",
    "APP_PROCESS_BALANCE_CHANGES_WAIT": "0.2",
    "APP_PROCESS_TRANSFER_REQUESTS_WAIT": "0.2",
    "APP_PROCESS_FINALIZATION_REQUESTS_WAIT": "0.2",
}
WORK_TABLES = ("transfer_request", "finalization_request", "pending_balance_change")
OUTBOX_TABLES = (
    "rejected_transfer_signal",
    "prepared_transfer_signal",
    "finalized_transfer_signal",
    "account_transfer_signal",
    "account_update_signal",
    "account_purge_signal",
    "rejected_config_signal",
    "pending_balance_change_signal",
)


# --- matching what arrives ----------------------------------------------------------


class Recent:
    """Equals a wire date-time (spec 01 §2.1) between `since` and now."""

    def __init__(self, since: dt.datetime):
        self.since = since

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, str) or WIRE_DATETIME.fullmatch(other) is None:
            return False
        moment = dt.datetime.fromisoformat(other)
        return self.since - CLOCK_SLACK <= moment <= dt.datetime.now(UTC) + CLOCK_SLACK

    def __repr__(self) -> str:
        return f"<a wire date-time after {self.since.isoformat()}>"


class Like:
    """Matches a received SMP message of one type whose named fields are equal to these."""

    def __init__(self, message_type: str, **fields: Any):
        self.message_type = message_type
        self.fields = fields

    def __call__(self, message: Received) -> bool:
        if message.properties.type != self.message_type:
            return False
        actual = message.fields
        return all(name in actual and actual[name] == value for name, value in self.fields.items())

    def __repr__(self) -> str:
        return f"<{self.message_type} with {self.fields}>"


Match = Callable[[Received], bool]


def wire_time(moment: dt.datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def assert_fields(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Same keys, equal values, and the same JSON types (an integral float stays a float)."""
    assert sorted(actual) == sorted(expected)
    mismatched = {
        name: (actual[name], value)
        for name, value in expected.items()
        if actual[name] != value or (type(value) in (int, float, str, bool) and type(actual[name]) is not type(value))
    }
    assert mismatched == {}, f"(actual, expected) by field: {mismatched}"


def assert_smp_message(message: Received, exchange: str, routing_key: str, expected: dict[str, Any]) -> None:
    """Exchange, routing key, properties and headers of spec 01 §3.1-3.2, and the exact body."""
    assert (message.exchange, message.routing_key) == (exchange, routing_key)
    properties = message.properties
    assert properties.content_type == JSON
    assert properties.type == expected["type"]
    assert properties.delivery_mode == 2
    assert properties.app_id == "swpt_accounts"
    unset = (
        properties.message_id,
        properties.timestamp,
        properties.priority,
        properties.expiration,
        properties.correlation_id,
        properties.content_encoding,
        properties.reply_to,
    )
    assert unset == (None,) * len(unset)
    headers = {
        "message-type": expected["type"],
        "debtor-id": expected["debtor_id"],
        "creditor-id": expected["creditor_id"],
    }
    if "coordinator_id" in expected:
        headers["coordinator-id"] = expected["coordinator_id"]
        headers["coordinator-type"] = expected["coordinator_type"]
    assert properties.headers == headers
    fields = message.fields
    assert_fields(fields, expected)
    # Compact, non-ASCII raw, floats as Python writes them (`1e+30`, `-50.0`).
    assert message.body == json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


def by_type(messages: list[Received]) -> dict[str, Received]:
    found = {message.properties.type: message for message in messages}
    assert len(found) == len(messages), [message.properties.type for message in messages]
    return found


def day_number(wire_date: str) -> int:
    return (dt.date.fromisoformat(wire_date) - dt.date(1970, 1, 1)).days


def first_transfer_id(creation_date: str) -> int:
    """Spec 01 §1.6: the counter starts at days_since_1970(creation_date) << 40."""
    return (day_number(creation_date) << 40) + 1


def random_id() -> int:
    """A random signed 64-bit id, never 0 (the root account)."""
    return random.choice((-1, 1)) * random.randint(1, MAX_INT64)


# --- the simulated peers and the shard under test ----------------------------------


class Inbox:
    """A temporary queue catching what pyswpt sends to the bound routing keys."""

    def __init__(self, channel: BlockingChannel, ignored_creditors: set[int], *, relaxed: bool = False):
        self.channel = channel
        self.queue = f"test_e2e_inbox_{uuid.uuid4().hex[:10]}"
        self.ignored_creditors = ignored_creditors
        self.relaxed = relaxed
        # Every message received (except the settle marker's), in arrival order.
        self.received: list[Received] = []
        # Received by a relaxed inbox and not yet returned by expect().
        self.kept: list[Received] = []
        channel.queue_declare(self.queue, exclusive=True)

    def bind(self, exchange: str, routing_key: str) -> None:
        self.channel.queue_bind(self.queue, exchange, routing_key)

    def take(self, count: int, timeout_seconds: float = WAIT_SECONDS) -> list[Received]:
        """Exactly `count` messages (those of the settle marker are dropped)."""
        received: list[Received] = []
        deadline = time.monotonic() + timeout_seconds
        while len(received) < count and time.monotonic() < deadline:
            message = self._get()
            if message is None:
                self.channel.connection.sleep(POLL_SECONDS)
            else:
                received.append(message)
        assert len(received) == count, f"expected {count} messages, got {[m.fields for m in received]}"
        return received

    def expect(self, *matches: Match, timeout_seconds: float = WAIT_SECONDS) -> list[Received]:
        """One message per match, in the order of the matches.

        Strict: the next len(matches) messages, each matching a different one.
        Relaxed: the earliest kept or new messages that match, each used once;
        the others stay kept for later.
        """
        if not self.relaxed:
            messages = self.take(len(matches), timeout_seconds)
            found = pair_up(messages, matches)
            unmatched = [match for match, message in zip(matches, found, strict=True) if message is None]
            assert unmatched == [], f"{unmatched} not among {[m.fields for m in messages]}"
            return found
        deadline = time.monotonic() + timeout_seconds
        while True:
            self.drain()
            found = pair_up(self.kept, matches)
            if all(message is not None for message in found):
                for message in found:
                    self.kept.remove(message)
                return found
            if time.monotonic() > deadline:
                missing = [match for match, message in zip(matches, found, strict=True) if message is None]
                pytest.fail(f"timed out after {timeout_seconds} s waiting for {missing}")
            self.channel.connection.sleep(POLL_SECONDS)

    def all_received(self, match: Match) -> list[Received]:
        """Every message received so far that matches, expected or not, in arrival order."""
        self.drain()
        return [message for message in self.received if match(message)]

    def drain(self) -> None:
        """Keep every message that has arrived by now (relaxed inbox)."""
        while (message := self._get()) is not None:
            self.kept.append(message)

    def assert_empty(self) -> None:
        left = [message.fields for message in self.kept]
        while (message := self._get()) is not None:
            left.append(message.fields)
        assert left == [], "unexpected messages arrived"

    def _get(self) -> Received | None:
        """The next message that is not the settle marker's, if one is there."""
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return None
            message = Received(method.exchange, method.routing_key, properties, body)
            if message.fields.get("creditor_id") not in self.ignored_creditors:
                self.received.append(message)
                return message


def pair_up(messages: list[Received], matches: tuple[Match, ...]) -> list[Received | None]:
    """For each match, the first message that matches it and no earlier match took."""
    taken: list[Received] = []
    found: list[Received | None] = []
    for match in matches:
        message = next((m for m in messages if match(m) and not any(m is t for t in taken)), None)
        if message is not None:
            taken.append(message)
        found.append(message)
    return found


@dataclasses.dataclass
class Shard:
    """One shard under test: its queue, database, drivers, and the peers around it."""

    rabbitmq_url: str
    database_url: str
    conn: psycopg.Connection
    log_dir: Path
    stack: contextlib.ExitStack
    channel: BlockingChannel
    queue: str
    debtor_id: int
    inbox: Inbox
    marker_creditor_id: int = 0
    marker_seqnum: int = 0
    # Driver settings of this shard, over DRIVER_SETTINGS.
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    # Set when the queue is bound by the shard's binding key (one of several
    # shards): peers then publish to `accounts_in`, which routes each message
    # to the shard owning its pair, and creditor() picks accounts this shard owns.
    realm: Realm | None = None

    # -- drivers

    def environment(self, **settings: str) -> dict[str, str]:
        return driver_environment(
            self.database_url,
            self.rabbitmq_url,
            PROTOCOL_BROKER_QUEUE=self.queue,
            **{**DRIVER_SETTINGS, **self.settings, **settings},
        )

    def start(self, *drivers: str, **settings: str) -> list[Running]:
        """`pyswpt run <driver>` for each, stopped (SIGTERM) when the test ends."""
        environ = self.environment(**settings)
        return [self.stack.enter_context(running(["run", driver], environ, self.log_dir)) for driver in drivers]

    # -- accounts

    def creditor(self, creditor_id: int | None = None) -> int:
        """A creditor id of this test: its messages reach the inbox, its changes this queue."""
        if creditor_id is None:
            creditor_id = random_id()
            while self.realm is not None and not self.realm.owns(self.debtor_id, creditor_id):
                creditor_id = random_id()
        self.inbox.bind("to_creditors", hex_routing_key(creditor_id))
        self.inbox.bind("accounts_in", binary_routing_key(self.debtor_id, creditor_id))
        if self.realm is None:
            self.channel.queue_bind(self.queue, "accounts_in", binary_routing_key(self.debtor_id, creditor_id))
        return creditor_id

    def account(self, creditor_id: int) -> dict[str, Any] | None:
        with self.conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(
                "SELECT * FROM account WHERE debtor_id = %s AND creditor_id = %s", (self.debtor_id, creditor_id)
            ).fetchone()

    def principal(self, creditor_id: int) -> int:
        row = self.account(creditor_id)
        assert row is not None
        return row["principal"]

    def count(self, query: str, *params: Any) -> int:
        return self.conn.execute(query, params).fetchone()[0]

    # -- messages from peers

    def publish(
        self,
        message_type: str | None,
        fields: dict[str, Any] | None = None,
        *,
        content_type: str | None = JSON,
        body: bytes | None = None,
    ) -> None:
        """Put a message into the SMP queue, as the broker would deliver it from a peer."""
        if body is None:
            body = json.dumps({"type": message_type, **(fields or {})}).encode()
        properties = pika.BasicProperties(content_type=content_type, type=message_type, delivery_mode=2)
        if self.realm is None:
            self.channel.basic_publish("", self.queue, body, properties)
        else:
            assert fields is not None, "the pair routes the message"
            routing_key = binary_routing_key(fields["debtor_id"], fields["creditor_id"])
            self.channel.basic_publish("accounts_in", routing_key, body, properties, mandatory=True)

    def configure(
        self,
        creditor_id: int,
        *,
        seqnum: int = 1,
        ts: dt.datetime | None = None,
        negligible_amount: float = 0.0,
        config_data: str = "",
        config_flags: int = 0,
    ) -> dict[str, Any]:
        fields = {
            "debtor_id": self.debtor_id,
            "creditor_id": creditor_id,
            "negligible_amount": negligible_amount,
            "config_data": config_data,
            "config_flags": config_flags,
            "seqnum": seqnum,
            "ts": wire_time(ts or now()),
        }
        self.publish("ConfigureAccount", fields)
        return fields

    def prepare(
        self,
        sender: int,
        recipient: str,
        *,
        request_id: int,
        min_locked: int,
        max_locked: int,
        coordinator_type: str = "direct",
        coordinator_id: int | None = None,
        final_interest_rate_ts: str = T_INFINITY,
        max_commit_delay: int = MAX_COMMIT_DELAY_SECONDS,
        ts: dt.datetime | None = None,
    ) -> dict[str, Any]:
        fields = {
            "debtor_id": self.debtor_id,
            "creditor_id": sender,
            "coordinator_type": coordinator_type,
            "coordinator_id": sender if coordinator_id is None else coordinator_id,
            "coordinator_request_id": request_id,
            "min_locked_amount": min_locked,
            "max_locked_amount": max_locked,
            "recipient": recipient,
            "final_interest_rate_ts": final_interest_rate_ts,
            "max_commit_delay": max_commit_delay,
            "ts": wire_time(ts or now()),
        }
        self.publish("PrepareTransfer", fields)
        return fields

    def finalize(
        self, prepared: dict[str, Any], committed_amount: int, note: str = "", note_format: str = ""
    ) -> dict[str, Any]:
        """FinalizeTransfer for a PreparedTransfer's fields."""
        fields = {
            "debtor_id": prepared["debtor_id"],
            "creditor_id": prepared["creditor_id"],
            "transfer_id": prepared["transfer_id"],
            "coordinator_type": prepared["coordinator_type"],
            "coordinator_id": prepared["coordinator_id"],
            "coordinator_request_id": prepared["coordinator_request_id"],
            "committed_amount": committed_amount,
            "transfer_note_format": note_format,
            "transfer_note": note,
            "ts": wire_time(now()),
        }
        self.publish("FinalizeTransfer", fields)
        return fields

    def balance_change(
        self, creditor_id: int, other_creditor_id: int, change_id: int, principal_delta: int
    ) -> dict[str, Any]:
        fields = {
            "debtor_id": self.debtor_id,
            "creditor_id": creditor_id,
            "change_id": change_id,
            "coordinator_type": "direct",
            "transfer_note_format": "",
            "transfer_note": "",
            "committed_at": wire_time(now()),
            "principal_delta": principal_delta,
            "other_creditor_id": other_creditor_id,
        }
        self.publish("PendingBalanceChange", fields)
        return fields

    # -- waiting for quiet

    def settle(self) -> None:
        """Wait until everything published so far is consumed, worked off and flushed.

        A marker config goes in behind it; the consumer applies a queue in order,
        so when the marker is stored everything before it is committed. Then the
        workers' queues and the outbox must empty. Needs all three drivers.
        """
        if self.marker_creditor_id == 0:
            self.marker_creditor_id = self.creditor()
            self.inbox.ignored_creditors.add(self.marker_creditor_id)
        self.marker_seqnum += 1
        self.configure(self.marker_creditor_id, seqnum=self.marker_seqnum)

        def marker_stored() -> bool:
            row = self.account(self.marker_creditor_id)
            return row is not None and row["last_config_seqnum"] == self.marker_seqnum

        wait_for(marker_stored, "the marker config", WAIT_SECONDS)
        wait_for(lambda: self.queued_rows(WORK_TABLES) == 0, "the workers' queues to empty", WAIT_SECONDS)
        wait_for(lambda: self.queued_rows(OUTBOX_TABLES) == 0, "the outbox to empty", WAIT_SECONDS)

    def queued_rows(self, tables: tuple[str, ...]) -> int:
        return sum(self.count(f"SELECT count(*) FROM {table}") for table in tables)

    def ready_messages(self) -> int:
        return self.channel.queue_declare(self.queue, passive=True).method.message_count


@contextlib.contextmanager
def open_shard(
    conn: psycopg.Connection,
    database_url: str,
    rabbitmq_url: str,
    log_dir: Path,
    *,
    queue_prefix: str = "pyswpt_test_e2e",
    relaxed: bool = False,
    settings: dict[str, str] | None = None,
) -> Iterator[Shard]:
    """A shard with its own SMP queue (deleted afterwards) and a random debtor id."""
    queue = f"{queue_prefix}_{uuid.uuid4().hex[:10]}"
    debtor_id = random_id()
    # Bound by the root account's key only; `creditor()` adds each account's key.
    topology.subscribe(rabbitmq_url, queue, binary_routing_key(debtor_id, 0))
    connection = topology.open_connection(rabbitmq_url)
    with connection as opened, contextlib.ExitStack() as stack:
        channel = opened.channel()
        channel.confirm_delivery()
        inbox = Inbox(opened.channel(), set(), relaxed=relaxed)
        inbox.bind("to_debtors", hex_routing_key(debtor_id))
        inbox.bind("accounts_in", binary_routing_key(debtor_id, 0))
        try:
            yield Shard(
                rabbitmq_url,
                database_url,
                conn,
                log_dir,
                stack,
                channel,
                queue,
                debtor_id,
                inbox,
                settings=dict(settings or {}),
            )
        finally:
            stack.close()  # the drivers stop before their queue goes
            channel.queue_delete(queue)
            channel.queue_delete(topology.dead_letter_queue_name(queue))


@contextlib.contextmanager
def process_group(args: list[str], environ: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """`pyswpt *args` as the leader of a new process group (so a signal reaches its workers)."""
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [*pyswpt_command(), *args], env=environ, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


# --- arranging accounts through messages ---------------------------------------------


def open_account(shard: Shard, creditor_id: int, **config: Any) -> dict[str, Any]:
    """Configure an account and return the fields of its first AccountUpdate."""
    fields = shard.configure(creditor_id, **config)
    [update] = shard.inbox.expect(
        Like(
            "AccountUpdate",
            creditor_id=creditor_id,
            last_config_ts=fields["ts"],
            last_config_seqnum=fields["seqnum"],
        )
    )
    return update.fields


def open_root_account(shard: Shard, **config: Any) -> dict[str, Any]:
    """A root account that may issue up to MAX_INT64 (negligible amount 1e30, spec 02 B7)."""
    return open_account(shard, 0, negligible_amount=1e30, **config)


def prepare_and_take(shard: Shard, sender: int, recipient: int, **request: Any) -> dict[str, Any]:
    fields = shard.prepare(sender, u64_string(recipient), **request)
    [prepared] = shard.inbox.expect(
        Like("PreparedTransfer", creditor_id=sender, coordinator_request_id=fields["coordinator_request_id"])
    )
    return prepared.fields


def issue(shard: Shard, recipient: int, amount: int, request_id: int = 1) -> None:
    """Money from the root account (which must exist) to `recipient`; waits for its arrival."""
    prepared = prepare_and_take(
        shard,
        0,
        recipient,
        request_id=request_id,
        min_locked=amount,
        max_locked=amount,
        coordinator_type="issuing",
        coordinator_id=shard.debtor_id,
    )
    shard.finalize(prepared, amount)
    shard.inbox.expect(
        Like("FinalizedTransfer", creditor_id=0, transfer_id=prepared["transfer_id"], status_code="OK"),
        *balance_change_message(shard, 0, recipient, principal_delta=amount),
        Like("AccountTransfer", creditor_id=recipient, coordinator_type="issuing", acquired_amount=amount),
    )


def balance_change_message(shard: Shard, sender: int, recipient: int, **fields: Any) -> list[Match]:
    """The PendingBalanceChange a payment from `sender` sends to `recipient`'s shard, if any.

    Within one shard there is none: the finalization queues the change itself.
    """
    mask = 0 if shard.realm is None else shard.realm.mask
    if shard_key(shard.debtor_id, sender) & mask == shard_key(shard.debtor_id, recipient) & mask:
        return []
    return [Like("PendingBalanceChange", creditor_id=recipient, other_creditor_id=sender, **fields)]


def funded_pair(shard: Shard, amount: int) -> tuple[int, int]:
    """Two accounts of one debtor; the first holds `amount`, issued by the root account."""
    sender, recipient = shard.creditor(), shard.creditor()
    open_root_account(shard)
    open_account(shard, sender)
    open_account(shard, recipient)
    issue(shard, sender, amount)
    return sender, recipient


def account_update_fields(
    shard: Shard, creditor_id: int, config: dict[str, Any], since: dt.datetime, **changed: Any
) -> dict[str, Any]:
    """The AccountUpdate of an account that only has a configuration (spec 02 §6 case 1)."""
    return {
        "type": "AccountUpdate",
        "debtor_id": shard.debtor_id,
        "creditor_id": creditor_id,
        "last_change_ts": Recent(since),
        "last_change_seqnum": 1,
        "principal": 0,
        "interest": 0.0,
        "interest_rate": 0.0,
        "transfer_note_max_bytes": 500,
        "demurrage_rate": -50.0,
        "last_interest_rate_change_ts": T0,
        "last_transfer_number": 0,
        "last_transfer_committed_at": T0,
        "last_config_ts": config["ts"],
        "last_config_seqnum": config["seqnum"],
        "creation_date": now().date().isoformat(),
        "negligible_amount": config["negligible_amount"],
        "config_data": config["config_data"],
        "config_flags": config["config_flags"],
        "ts": Recent(since),
        "ttl": TTL_SECONDS,
        "commit_period": COMMIT_PERIOD_SECONDS,
        "account_id": u64_string(creditor_id),
        "debtor_info_iri": "",
        "debtor_info_content_type": "",
        "debtor_info_sha256": "",
        **changed,
    }
