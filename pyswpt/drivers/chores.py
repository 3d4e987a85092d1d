"""The chores consumer (`pyswpt run chores`): chores from the accounts scanner into SQL calls.

Same loop as the SMP consumer (pyswpt.consuming): a batch of deliveries is
decoded, each valid chore becomes one SQL function call, the calls run in one
transaction, acks follow the commit. Differences (spec 01 §3.6, spec 02 §4.7):

* A chore for an account this shard does not own is acked and ignored: after
  a split both children receive the parent's chores, and acting on both would
  pay interest twice.
* The chores queue has no dead-letter queue: a rejected chore would be gone,
  so it is parked in PostgreSQL first (pyswpt.applying), like SMP messages.
* `debtor_info_sha256` is decoded whatever the case of its hex digits; the
  reference accepts lowercase in validation, then fails on it forever.
"""

from __future__ import annotations

import logging
import threading

import psycopg

from pyswpt import applying, consuming, messages, processes, queries
from pyswpt.applying import Applied, Item, Refusal, WindowApplier
from pyswpt.config import SECONDS_IN_DAY, Config
from pyswpt.logs import one_line
from pyswpt.messages import CapitalizeInterest, ChangeInterestRate, InvalidMessage, TryToDeleteAccount, UpdateDebtorInfo
from pyswpt.transactions import SqlCall

logger = logging.getLogger(__name__)


def run(config: Config) -> int:
    announce(config)
    return processes.run_worker_processes(config.chores_broker_processes, consume, config)


def run_in_thread(config: Config, stopping: threading.Event) -> None:
    """The chores consumer as `run all` runs it with one process: in a thread of the supervisor,
    until `stopping` is set; raises the error of a consumer thread that failed."""
    announce(config)
    consume(config, stopping)


def announce(config: Config) -> None:
    logger.info(
        "Starting the chores consumer: processes %d, threads per process %d, queue %s, prefetch count %d.",
        config.chores_broker_processes,
        config.chores_broker_threads,
        config.chores_broker_queue,
        config.chores_broker_prefetch_count,
        extra={"queue": config.chores_broker_queue},
    )


def consume(config: Config, stopping: threading.Event) -> None:
    settings = consuming.QueueSettings(
        broker_url=config.chores_broker_url,
        queue=config.chores_broker_queue,
        prefetch_count=config.chores_broker_prefetch_count,
        prefetch_size=config.chores_broker_prefetch_size,
        api_wait_seconds=config.api_wait_seconds,
    )
    consuming.consume_in_threads(
        settings, config.driver_postgres_url, config.chores_broker_threads, lambda: ChoresBatchHandler(config), stopping
    )


class ChoresBatchHandler:
    """Applies one batch of chore deliveries."""

    def __init__(self, config: Config):
        self.config = config
        self.applier = WindowApplier(config.chores_broker_queue)

    def __call__(self, conn: psycopg.Connection, deliveries: list[consuming.Delivery]) -> consuming.BatchOutcome:
        outcome = consuming.BatchOutcome()
        items: list[Item] = []
        for delivery in deliveries:
            item = self.item(delivery)
            if item is None:
                outcome.acked.append(delivery.delivery_tag)
                outcome.ignored.append(delivery.delivery_tag)
            else:
                items.append(item)
        for item, result in zip(items, self.applier.apply(conn, items), strict=True):
            tag = item.delivery.delivery_tag
            if isinstance(result, Applied):
                outcome.acked.append(tag)
            elif isinstance(result, applying.Parked):
                outcome.rejected.append(tag)
                if not result.stored:
                    outcome.not_parked.append(tag)
            else:
                outcome.requeued.append(tag)
        return outcome

    def item(self, delivery: consuming.Delivery) -> Item | None:
        """What to do with one chore: its SQL call, why it is parked, or None to ignore it."""
        try:
            chore = decode(delivery)
        except InvalidMessage as error:
            what = f"a chore of type {one_line(repr(delivery.properties.type))}"
            return Item(delivery, what, refusal=Refusal("invalid", str(error)))
        if not self.config.realm.owns(chore.debtor_id, chore.creditor_id):
            return None
        return Item(
            delivery,
            describe(chore),
            call=sql_call(chore, self.config),
            debtor_id=chore.debtor_id,
            creditor_id=chore.creditor_id,
        )


def decode(delivery: consuming.Delivery) -> messages.Chore:
    properties = delivery.properties
    return messages.decode(properties.content_type, properties.type, delivery.body, messages.CHORE_KINDS)


def sql_call(chore: messages.Chore, config: Config) -> SqlCall:
    """The one SQL function call that carries out a chore (spec 02 §2.7-§2.10)."""
    key = {"debtor_id": chore.debtor_id, "creditor_id": chore.creditor_id}
    if isinstance(chore, ChangeInterestRate):
        return SqlCall(
            queries.CHANGE_INTEREST_RATE,
            {
                **key,
                "interest_rate": chore.interest_rate,
                "ts": chore.ts,
                "message_max_delay_seconds": config.message_max_delay_seconds,
            },
        )
    if isinstance(chore, UpdateDebtorInfo):
        return SqlCall(
            queries.UPDATE_DEBTOR_INFO,
            {
                **key,
                "iri": chore.debtor_info_iri or None,
                "content_type": chore.debtor_info_content_type or None,
                "sha256": bytes.fromhex(chore.debtor_info_sha256) if chore.debtor_info_sha256 else None,
                "ts": chore.ts,
            },
        )
    if isinstance(chore, CapitalizeInterest):
        return SqlCall(
            queries.CAPITALIZE_INTEREST,
            {
                **key,
                "min_capitalization_interval_seconds": config.min_interest_capitalization_days * SECONDS_IN_DAY,
            },
        )
    if isinstance(chore, TryToDeleteAccount):
        return SqlCall(queries.TRY_TO_DELETE_ACCOUNT, key)
    raise AssertionError(f"no SQL call for {type(chore).__name__}")


def describe(chore: messages.Chore) -> str:
    return f"{chore.TYPE} for account ({chore.debtor_id}, {chore.creditor_id})"
