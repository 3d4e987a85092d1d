"""The SMP consumer (`pyswpt run consumer`): incoming SMP messages into SQL calls.

A batch of deliveries is decoded and validated, each valid message becomes one
SQL function call, and the calls run in one transaction; acks follow the commit.
The window prepares and finalizes transfers at once where their senders are
free, which the workers do otherwise (in_applying_order, FinalizingAtOnce).
Malformed messages, messages for accounts of another shard and messages the
database refuses are parked in PostgreSQL, logged in one line and rejected to
the dead-letter queue (pyswpt.applying) — the reference loops forever on some
of them; here one bad message never holds up the others.

With `--draining-mode` (spec 01 §3.6, §4.4) the consumer retires a parent
shard's queue after a split: it steps back from the queue when idle (see
pyswpt.consuming), and hands the messages of the sibling shard on to it
(pyswpt.handoff) instead of parking them as foreign.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading

import psycopg

from pyswpt import applying, consuming, messages, metrics, processes, queries
from pyswpt.applying import Applied, Closing, Item, Refusal, WindowApplier
from pyswpt.config import Config
from pyswpt.fetch import FetchClient, FetchError
from pyswpt.handoff import HandOn
from pyswpt.logs import one_line
from pyswpt.messages import ConfigureAccount, FinalizeTransfer, InvalidMessage, PendingBalanceChange, PrepareTransfer
from pyswpt.sharding import MAX_INT64, MIN_INT64
from pyswpt.transactions import SqlCall, describe_error, with_retries

logger = logging.getLogger(__name__)

ROOT_CREDITOR_ID = 0
# The top 24 bits of a creditor id name its creditors agent (spec 02 §0).
CREDITOR_SUBNET_MASK = 0xFFFFFF0000000000


def run(config: Config, draining_mode: bool = False) -> int:
    logger.info(
        "Starting the SMP consumer: processes %d, threads per process %d, queue %s, prefetch count %d.",
        config.protocol_broker_processes,
        config.protocol_broker_threads,
        config.protocol_broker_queue,
        config.protocol_broker_prefetch_count,
        extra={"queue": config.protocol_broker_queue},
    )
    return processes.run_worker_processes(config.protocol_broker_processes, consume, config, draining_mode)


def consume(config: Config, draining_mode: bool, stopping: threading.Event) -> bool:
    """Consume until stopped; True once a drained queue is gone."""
    settings = consuming.QueueSettings(
        broker_url=config.protocol_broker_url,
        queue=config.protocol_broker_queue,
        prefetch_count=config.protocol_broker_prefetch_count,
        prefetch_size=config.protocol_broker_prefetch_size,
        api_wait_seconds=config.api_wait_seconds,
        draining=draining_mode,
    )
    return consuming.consume_in_threads(
        settings,
        config.driver_postgres_url,
        config.protocol_broker_threads,
        lambda: SmpBatchHandler(config, draining_mode),
        stopping,
    )


@dataclasses.dataclass
class Decoded:
    """One delivery decoded: what to apply or park, or (draining) a sibling shard's message to hand on."""

    item: Item
    message: messages.Message | None
    hand_on: bool = False


class SmpBatchHandler:
    """Applies one batch of SMP deliveries (one handler per consumer thread)."""

    def __init__(self, config: Config, draining: bool = False):
        self.config = config
        self.fetch = (
            FetchClient(
                config.fetch_api_url,
                timeout_seconds=config.fetch_api_timeout_seconds,
                cache_size=config.fetch_data_cache_size,
            )
            if config.fetch_api_url
            else None
        )
        self.applier = WindowApplier(config.protocol_broker_queue)
        self.at_once = metrics.AtOnceCounts(config.protocol_broker_queue)
        self.hand_on = HandOn(config.protocol_broker_url, config.protocol_broker_queue) if draining else None

    def __call__(self, conn: psycopg.Connection, deliveries: list[consuming.Delivery]) -> consuming.BatchOutcome:
        outcome = consuming.BatchOutcome()
        decoded = [self.decode(delivery) for delivery in deliveries]
        to_apply = in_applying_order([d for d in decoded if not d.hand_on])
        closings = FinalizingAtOnce(self.config)
        results = self.applier.apply(conn, [d.item for d in to_apply], closings)
        self.count_at_once(to_apply, results, closings.made)
        new_accounts = []
        for d, result in zip(to_apply, results, strict=True):
            tag = d.item.delivery.delivery_tag
            if isinstance(result, Applied):
                outcome.acked.append(tag)
                if isinstance(d.message, ConfigureAccount) and result.row is not None and result.row[0]:
                    new_accounts.append(d.message)
            elif isinstance(result, applying.Parked):
                outcome.rejected.append(tag)
                if not result.stored:
                    outcome.not_parked.append(tag)
            else:
                outcome.requeued.append(tag)
        for message in new_accounts:
            self.initialize_or_log(conn, message)
        # After the commit: a database retry of the batch must not publish the sibling's messages again.
        self.hand_on_siblings([d for d in decoded if d.hand_on], outcome)
        return outcome

    def hand_on_siblings(self, siblings: list[Decoded], outcome: consuming.BatchOutcome) -> None:
        """Publish the sibling shard's messages to it; ack those the broker took, hand the others back."""
        if not siblings:
            return
        taken = self.hand_on.hand_on([(d.item.delivery, d.item.debtor_id, d.item.creditor_id) for d in siblings])
        for d, was_taken in zip(siblings, taken, strict=True):
            (outcome.acked if was_taken else outcome.requeued).append(d.item.delivery.delivery_tag)

    def decode(self, delivery: consuming.Delivery) -> Decoded:
        """What to do with one delivery: its SQL call, why it is parked, or hand it on."""
        try:
            message = messages.decode(
                delivery.properties.content_type, delivery.properties.type, delivery.body, messages.SMP_KINDS
            )
        except InvalidMessage as error:
            debtor_id, creditor_id = ids_in_body(delivery.body)
            what = f"a message of type {one_line(repr(delivery.properties.type))}"
            refusal = Refusal("invalid", str(error))
            return Decoded(Item(delivery, what, refusal=refusal, debtor_id=debtor_id, creditor_id=creditor_id), None)
        item = Item(delivery, describe(message), debtor_id=message.debtor_id, creditor_id=message.creditor_id)
        realm = self.config.realm
        if not realm.owns(message.debtor_id, message.creditor_id):
            if self.hand_on is not None and realm.parent_owns(message.debtor_id, message.creditor_id):
                return Decoded(item, message, hand_on=True)
            item.refusal = Refusal(
                "foreign_shard",
                "The shard is not responsible for this account; check the queue's binding key "
                "and PROTOCOL_BROKER_QUEUE_ROUTING_KEY.",
            )
            return Decoded(item, message)
        try:
            item.call = self.sql_call(message)
        except InvalidMessage as error:
            item.refusal = Refusal("invalid", str(error))
        return Decoded(item, message)

    def sql_call(self, message: messages.Message) -> SqlCall:
        config = self.config
        if isinstance(message, ConfigureAccount):
            return SqlCall(
                queries.CONFIGURE_ACCOUNT,
                {
                    "debtor_id": message.debtor_id,
                    "creditor_id": message.creditor_id,
                    "ts": message.ts,
                    "seqnum": message.seqnum,
                    "negligible_amount": message.negligible_amount,
                    "config_flags": message.config_flags,
                    "config_data": message.config_data,
                    "max_delay_seconds": config.message_max_delay_seconds,
                },
            )
        if isinstance(message, PrepareTransfer):
            recipient = messages.parse_recipient(message.recipient)
            return SqlCall(
                queries.ENQUEUE_TRANSFER_REQUEST,
                {
                    "debtor_id": message.debtor_id,
                    "sender_creditor_id": message.creditor_id,
                    "coordinator_type": message.coordinator_type,
                    "coordinator_id": message.coordinator_id,
                    "coordinator_request_id": message.coordinator_request_id,
                    "min_locked_amount": message.min_locked_amount,
                    "max_locked_amount": message.max_locked_amount,
                    "recipient_creditor_id": recipient,
                    "final_interest_rate_ts": message.final_interest_rate_ts,
                    "max_commit_delay_seconds": message.max_commit_delay,
                    "ts": message.ts,
                    "recipient_reachable": self.recipient_reachable(message, recipient),
                    "commit_period_seconds": config.commit_period_seconds,
                },
            )
        if isinstance(message, FinalizeTransfer):
            return SqlCall(
                queries.ENQUEUE_FINALIZATION_REQUEST,
                {
                    "debtor_id": message.debtor_id,
                    "sender_creditor_id": message.creditor_id,
                    "transfer_id": message.transfer_id,
                    "coordinator_type": message.coordinator_type,
                    "coordinator_id": message.coordinator_id,
                    "coordinator_request_id": message.coordinator_request_id,
                    "committed_amount": message.committed_amount,
                    "transfer_note_format": message.transfer_note_format,
                    "transfer_note": message.transfer_note,
                    "ts": message.ts,
                },
            )
        if isinstance(message, PendingBalanceChange):
            return SqlCall(
                queries.REGISTER_BALANCE_CHANGE,
                {
                    "debtor_id": message.debtor_id,
                    "other_creditor_id": message.other_creditor_id,
                    "change_id": message.change_id,
                    "creditor_id": message.creditor_id,
                    "coordinator_type": message.coordinator_type,
                    "transfer_note_format": message.transfer_note_format,
                    "transfer_note": message.transfer_note,
                    "committed_at": message.committed_at,
                    "principal_delta": message.principal_delta,
                    "archive_threshold": config.remove_from_archive_threshold_date,
                },
            )
        raise AssertionError(f"no SQL call for {type(message).__name__}")

    def count_at_once(self, applied: list[Decoded], results: list[applying.Result], closings: list[Closing]) -> None:
        """Count what the window did at once and what it left to the workers' stages (metrics.CONSUMER_AT_ONCE)."""
        # enqueue_transfer_request says whether it queued the request.
        queued = [
            result.row[0]
            for d, result in zip(applied, results, strict=True)
            if isinstance(d.message, PrepareTransfer) and isinstance(result, Applied)
        ]
        self.at_once.count("prepare", done=queued.count(False), left=queued.count(True))
        for closing in closings:
            if closing.row is not None:
                served = closing.row[0]
                self.at_once.count("finalize", done=served, left=len(closing.call.params["debtor_ids"]) - served)

    def recipient_reachable(self, message: PrepareTransfer, recipient: int | None) -> bool | None:
        """True/False when decided here; None lets SQL decide (the recipient is in this shard)."""
        if recipient is None:
            return False
        if message.coordinator_type == "agent":
            # Agents move money between their own creditors, whose accounts they
            # create on demand: no lookup. A coordinator outside the sender's agent
            # breaks a MUST of the protocol; the reference loops forever on it.
            if not same_agent(message.creditor_id, message.coordinator_id):
                raise InvalidMessage(
                    "Message validation error: {'coordinator_id': ['Must belong to the agent of creditor_id.']}"
                )
            return True
        if self.config.realm.owns(message.debtor_id, recipient):
            return None
        if self.fetch is None:
            logger.error("FETCH_API_URL is not set: the recipient of %s is taken as unreachable.", describe(message))
            return False
        return self.fetch.is_reachable(message.debtor_id, recipient)

    def initialize_or_log(self, conn: psycopg.Connection, message: ConfigureAccount) -> None:
        """Initialize a new account; a failure is logged, since the accounts scanner catches up.

        The ConfigureAccount itself is committed by now and must be acked.
        """
        try:
            self.initialize(conn, message)
        except psycopg.Error as error:
            logger.error(
                "Could not give the new account (%d, %d) its debtor's settings (%s); the accounts scanner will.",
                message.debtor_id,
                message.creditor_id,
                describe_error(error),
            )

    def initialize(self, conn: psycopg.Connection, message: ConfigureAccount) -> None:
        """Give a new account its debtor's interest rate and info (spec 02 §2.3)."""
        config_data = self.root_config_data(conn, message.debtor_id)
        if config_data is None:
            return
        with_retries(
            conn,
            lambda c: c.execute(
                queries.INITIALIZE_ACCOUNT,
                {
                    "debtor_id": message.debtor_id,
                    "creditor_id": message.creditor_id,
                    "root_config_data": config_data,
                    "message_max_delay_seconds": self.config.message_max_delay_seconds,
                },
            ),
        )

    def root_config_data(self, conn: psycopg.Connection, debtor_id: int) -> str | None:
        if self.config.realm.owns(debtor_id, ROOT_CREDITOR_ID):
            params = {"debtor_id": debtor_id}
            return with_retries(conn, lambda c: c.execute(queries.GET_ROOT_CONFIG_DATA, params).fetchone()[0])
        if self.fetch is None:
            logger.error("FETCH_API_URL is not set: debtor %d's root config cannot be fetched.", debtor_id)
            return None
        try:
            return self.fetch.root_config_data(debtor_id)
        except FetchError:
            logger.exception("Caught error while making a fetch request.")
            return None


class FinalizingAtOnce:
    """The closing call of each transaction that applies a window's messages (applying.ClosingFor).

    A transaction that queues FinalizeTransfers ends by serving them where their
    senders are free (pyswpt_api.finalize_at_once), and wakes the finalization
    stage only for those it leaves (the intake's p_finalized_at_once): the
    window's transaction, or each message's when the window is applied one at a
    time. `made` keeps every closing given, for the counts of what was done at once.
    """

    def __init__(self, config: Config):
        self.config = config
        self.made: list[Closing] = []

    def __call__(self, items: list[Item]) -> Closing | None:
        senders = dict.fromkeys(
            (item.debtor_id, item.creditor_id)
            for item in items
            if item.call is not None and item.call.query == queries.ENQUEUE_FINALIZATION_REQUEST
        )
        if not senders:
            return None
        closing = Closing(
            SqlCall(
                queries.FINALIZE_AT_ONCE,
                {
                    "debtor_ids": [debtor_id for debtor_id, _ in senders],
                    "sender_creditor_ids": [creditor_id for _, creditor_id in senders],
                    "realm_mask": self.config.realm.mask,
                    "realm": self.config.realm.realm,
                },
            )
        )
        self.made.append(closing)
        return closing


def in_applying_order(decoded: list[Decoded]) -> list[Decoded]:
    """The window's messages with the PrepareTransfers to apply moved last, in their order.

    A PrepareTransfer may lock its sender's account at once, without waiting
    (try_to_prepare_at_once, sql/functions/40_prepare_transfer.sql); the other
    calls may wait for a row (a ConfigureAccount for its account, an intake's
    ON CONFLICT for a row being deleted). Applied after them, the window never
    waits while it holds such a lock, so it cannot close a cycle of waits.
    """
    return sorted(decoded, key=lambda d: isinstance(d.message, PrepareTransfer) and d.item.call is not None)


def same_agent(creditor_id: int, coordinator_id: int) -> bool:
    prefix = creditor_id & CREDITOR_SUBNET_MASK
    return prefix == coordinator_id & CREDITOR_SUBNET_MASK and prefix != 0


def ids_in_body(body: bytes) -> tuple[int | None, int | None]:
    """The debtor and creditor ids of a message that failed validation, where they can be read."""
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(fields, dict):
        return None, None
    return tuple(
        value if isinstance(value, int) and not isinstance(value, bool) and MIN_INT64 <= value <= MAX_INT64 else None
        for value in (fields.get("debtor_id"), fields.get("creditor_id"))
    )


def describe(message: messages.Message) -> str:
    return f"{type(message).__name__} for account ({message.debtor_id}, {message.creditor_id})"
