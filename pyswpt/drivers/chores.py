"""The chores consumer (`pyswpt run chores`): chores from the accounts scanner into SQL calls.

Same loop as the SMP consumer (pyswpt.consuming): a batch of deliveries is
decoded, each valid chore becomes one SQL function call, the calls run in one
transaction, acks follow the commit. Differences (spec 01 §3.6, spec 02 §4.7):

* A chore for an account this shard does not own is acked and ignored: after
  a split both children receive the parent's chores, and acting on both would
  pay interest twice.
* Rejected chores are dropped (the chores queue has no dead-letter queue), so
  each one is logged with its reason.
* `debtor_info_sha256` is decoded whatever the case of its hex digits; the
  reference accepts lowercase in validation, then fails on it forever.
"""

from __future__ import annotations

import logging
import threading

import psycopg

from pyswpt import consuming, messages, processes
from pyswpt.config import SECONDS_IN_DAY, Config
from pyswpt.messages import CapitalizeInterest, ChangeInterestRate, InvalidMessage, TryToDeleteAccount, UpdateDebtorInfo
from pyswpt.transactions import SqlCall, execute_as_batch

logger = logging.getLogger(__name__)

CHANGE_INTEREST_RATE = "SELECT pyswpt.change_interest_rate(%s, %s, %s, %s, %s)"
UPDATE_DEBTOR_INFO = "SELECT pyswpt.update_debtor_info(%s, %s, %s, %s, %s, %s)"
CAPITALIZE_INTEREST = "SELECT pyswpt.capitalize_interest(%s, %s, %s)"
TRY_TO_DELETE_ACCOUNT = "SELECT pyswpt.try_to_delete_account(%s, %s)"


def run(config: Config) -> int:
    return processes.run_worker_processes(config.chores_broker_processes, consume, config)


def consume(config: Config, stopping: threading.Event) -> None:
    settings = consuming.QueueSettings(
        broker_url=config.chores_broker_url,
        queue=config.chores_broker_queue,
        prefetch_count=config.chores_broker_prefetch_count,
        prefetch_size=config.chores_broker_prefetch_size,
    )
    consuming.consume_in_threads(
        settings, config.postgres_url, config.chores_broker_threads, lambda: ChoresBatchHandler(config), stopping
    )


class ChoresBatchHandler:
    """Applies one batch of chore deliveries."""

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, conn: psycopg.Connection, deliveries: list[consuming.Delivery]) -> consuming.BatchOutcome:
        outcome = consuming.BatchOutcome()
        accepted: list[tuple[consuming.Delivery, messages.Chore, SqlCall]] = []
        for delivery in deliveries:
            try:
                chore = decode(delivery)
            except InvalidMessage as error:
                logger.error("%s The chore is dropped.", error)
                outcome.rejected.append(delivery.delivery_tag)
                continue
            if not self.config.realm.owns(chore.debtor_id, chore.creditor_id):
                outcome.acked.append(delivery.delivery_tag)
                continue
            accepted.append((delivery, chore, sql_call(chore, self.config)))

        results = execute_as_batch(conn, [call for _, _, call in accepted])
        for (delivery, chore, _call), result in zip(accepted, results):
            if isinstance(result, psycopg.Error):
                logger.error("The database refused %s: %s The chore is dropped.", describe(chore), result)
                outcome.rejected.append(delivery.delivery_tag)
            else:
                outcome.acked.append(delivery.delivery_tag)
        return outcome


def decode(delivery: consuming.Delivery) -> messages.Chore:
    properties = delivery.properties
    return messages.decode(properties.content_type, properties.type, delivery.body, messages.CHORE_KINDS)


def sql_call(chore: messages.Chore, config: Config) -> SqlCall:
    """The one SQL function call that carries out a chore (spec 02 §2.7-§2.10)."""
    key = (chore.debtor_id, chore.creditor_id)
    if isinstance(chore, ChangeInterestRate):
        return SqlCall(CHANGE_INTEREST_RATE, (*key, chore.interest_rate, chore.ts, config.message_max_delay_seconds))
    if isinstance(chore, UpdateDebtorInfo):
        return SqlCall(
            UPDATE_DEBTOR_INFO,
            (
                *key,
                chore.debtor_info_iri or None,
                chore.debtor_info_content_type or None,
                bytes.fromhex(chore.debtor_info_sha256) if chore.debtor_info_sha256 else None,
                chore.ts,
            ),
        )
    if isinstance(chore, CapitalizeInterest):
        return SqlCall(CAPITALIZE_INTEREST, (*key, config.min_interest_capitalization_days * SECONDS_IN_DAY))
    if isinstance(chore, TryToDeleteAccount):
        return SqlCall(TRY_TO_DELETE_ACCOUNT, key)
    raise AssertionError(f"no SQL call for {type(chore).__name__}")


def describe(chore: messages.Chore) -> str:
    return f"{chore.TYPE} for account ({chore.debtor_id}, {chore.creditor_id})"
