"""The eight outbox tables and how their rows become SMP messages (spec 01 §1.6, §2.2).

Each row already holds everything its message needs; the only inputs from
outside the row are the two configured constants of AccountUpdate. Fields are
listed in the order of the spec's examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from pyswpt import queries
from pyswpt.config import Config
from pyswpt.sharding import u64_string

Row = Mapping[str, Any]
Fields = dict[str, Any]

TRANSFER_NOTE_MAX_BYTES = 500
DEMURRAGE_RATE = -50.0


def rejected_transfer(row: Row, config: Config) -> Fields:
    return {
        "type": "RejectedTransfer",
        "coordinator_type": row["coordinator_type"],
        "coordinator_id": row["coordinator_id"],
        "coordinator_request_id": row["coordinator_request_id"],
        "status_code": row["status_code"],
        "total_locked_amount": row["total_locked_amount"],
        "debtor_id": row["debtor_id"],
        "creditor_id": row["sender_creditor_id"],
        "ts": row["inserted_at"],
    }


def prepared_transfer(row: Row, config: Config) -> Fields:
    return {
        "type": "PreparedTransfer",
        "debtor_id": row["debtor_id"],
        "creditor_id": row["sender_creditor_id"],
        "transfer_id": row["transfer_id"],
        "coordinator_type": row["coordinator_type"],
        "coordinator_id": row["coordinator_id"],
        "coordinator_request_id": row["coordinator_request_id"],
        "locked_amount": row["locked_amount"],
        "recipient": u64_string(row["recipient_creditor_id"]),
        "prepared_at": row["prepared_at"],
        "ts": row["inserted_at"],
        "demurrage_rate": row["demurrage_rate"],
        "deadline": row["deadline"],
        "final_interest_rate_ts": row["final_interest_rate_ts"],
    }


def finalized_transfer(row: Row, config: Config) -> Fields:
    return {
        "type": "FinalizedTransfer",
        "debtor_id": row["debtor_id"],
        "creditor_id": row["sender_creditor_id"],
        "transfer_id": row["transfer_id"],
        "coordinator_type": row["coordinator_type"],
        "coordinator_id": row["coordinator_id"],
        "coordinator_request_id": row["coordinator_request_id"],
        "prepared_at": row["prepared_at"],
        "ts": row["finalized_at"],
        "committed_amount": row["committed_amount"],
        "total_locked_amount": row["total_locked_amount"],
        "status_code": row["status_code"],
    }


def account_transfer(row: Row, config: Config) -> Fields:
    account = u64_string(row["creditor_id"])
    other = u64_string(row["other_creditor_id"])
    incoming = row["acquired_amount"] >= 0
    return {
        "type": "AccountTransfer",
        "debtor_id": row["debtor_id"],
        "creditor_id": row["creditor_id"],
        "creation_date": row["creation_date"],
        "transfer_number": row["transfer_number"],
        "coordinator_type": row["coordinator_type"],
        "committed_at": row["committed_at"],
        "acquired_amount": row["acquired_amount"],
        "transfer_note_format": row["transfer_note_format"],
        "transfer_note": row["transfer_note"],
        "principal": row["principal"],
        "previous_transfer_number": row["previous_transfer_number"],
        "sender": other if incoming else account,
        "recipient": account if incoming else other,
        "ts": row["inserted_at"],
    }


def account_update(row: Row, config: Config) -> Fields:
    return {
        "type": "AccountUpdate",
        "debtor_id": row["debtor_id"],
        "creditor_id": row["creditor_id"],
        "last_change_ts": row["last_change_ts"],
        "last_change_seqnum": row["last_change_seqnum"],
        "principal": row["principal"],
        "interest": row["interest"],
        "interest_rate": row["interest_rate"],
        "transfer_note_max_bytes": TRANSFER_NOTE_MAX_BYTES,
        "demurrage_rate": DEMURRAGE_RATE,
        "last_interest_rate_change_ts": row["last_interest_rate_change_ts"],
        "last_transfer_number": row["last_transfer_number"],
        "last_transfer_committed_at": row["last_transfer_committed_at"],
        "last_config_ts": row["last_config_ts"],
        "last_config_seqnum": row["last_config_seqnum"],
        "creation_date": row["creation_date"],
        "negligible_amount": row["negligible_amount"],
        "config_data": row["config_data"],
        "config_flags": row["config_flags"],
        "ts": row["inserted_at"],
        "ttl": config.message_max_delay_seconds,
        "commit_period": config.commit_period_seconds,
        "account_id": u64_string(row["creditor_id"]),
        # None becomes "" and the hash uppercase hex in wire.smp_body.
        "debtor_info_iri": row["debtor_info_iri"],
        "debtor_info_content_type": row["debtor_info_content_type"],
        "debtor_info_sha256": row["debtor_info_sha256"],
    }


def account_purge(row: Row, config: Config) -> Fields:
    return {
        "type": "AccountPurge",
        "debtor_id": row["debtor_id"],
        "creditor_id": row["creditor_id"],
        "creation_date": row["creation_date"],
        "ts": row["inserted_at"],
    }


def rejected_config(row: Row, config: Config) -> Fields:
    return {
        "type": "RejectedConfig",
        "debtor_id": row["debtor_id"],
        "creditor_id": row["creditor_id"],
        "config_ts": row["config_ts"],
        "config_seqnum": row["config_seqnum"],
        "negligible_amount": row["negligible_amount"],
        "config_data": row["config_data"],
        "config_flags": row["config_flags"],
        "ts": row["inserted_at"],
        "rejection_code": row["rejection_code"],
    }


def pending_balance_change(row: Row, config: Config) -> Fields:
    return {
        "type": "PendingBalanceChange",
        "debtor_id": row["debtor_id"],
        "creditor_id": row["creditor_id"],
        "change_id": row["change_id"],
        "coordinator_type": row["coordinator_type"],
        "transfer_note_format": row["transfer_note_format"],
        "transfer_note": row["transfer_note"],
        "committed_at": row["committed_at"],
        "principal_delta": row["principal_delta"],
        "other_creditor_id": row["other_creditor_id"],
    }


@dataclasses.dataclass(frozen=True)
class OutboxTable:
    name: str  # as in the flush_<name> commands and APP_FLUSH_<NAME>_BURST_COUNT
    take_query: str  # from pyswpt.queries: take and delete up to %(max_count)s rows
    to_fields: Callable[[Row, Config], Fields]
    creditor_column: str  # whose shard the row belongs to
    key_columns: tuple[str, ...]  # the primary key: names a row in logs, never its contents
    shard_checked: bool = True

    @property
    def signal_table(self) -> str:
        """The table in the database, whose inserts NOTIFY with its name (rejected_transfers:
        rejected_transfer_signal)."""
        return f"{self.name.removesuffix('s')}_signal"


SIGNAL_KEY = ("debtor_id", "creditor_id", "signal_id")
SENT_SIGNAL_KEY = ("debtor_id", "sender_creditor_id", "signal_id")

TABLES = (
    OutboxTable(
        "rejected_transfers",
        queries.TAKE_REJECTED_TRANSFER_SIGNALS,
        rejected_transfer,
        "sender_creditor_id",
        SENT_SIGNAL_KEY,
    ),
    OutboxTable(
        "prepared_transfers",
        queries.TAKE_PREPARED_TRANSFER_SIGNALS,
        prepared_transfer,
        "sender_creditor_id",
        SENT_SIGNAL_KEY,
    ),
    OutboxTable(
        "finalized_transfers",
        queries.TAKE_FINALIZED_TRANSFER_SIGNALS,
        finalized_transfer,
        "sender_creditor_id",
        ("debtor_id", "sender_creditor_id", "transfer_id"),
    ),
    OutboxTable(
        "account_transfers",
        queries.TAKE_ACCOUNT_TRANSFER_SIGNALS,
        account_transfer,
        "creditor_id",
        ("debtor_id", "creditor_id", "creation_date", "transfer_number"),
    ),
    OutboxTable("account_updates", queries.TAKE_ACCOUNT_UPDATE_SIGNALS, account_update, "creditor_id", SIGNAL_KEY),
    OutboxTable(
        "account_purges",
        queries.TAKE_ACCOUNT_PURGE_SIGNALS,
        account_purge,
        "creditor_id",
        ("debtor_id", "creditor_id", "creation_date"),
    ),
    OutboxTable("rejected_configs", queries.TAKE_REJECTED_CONFIG_SIGNALS, rejected_config, "creditor_id", SIGNAL_KEY),
    # Addressed to the shard of its recipient, which is usually another shard.
    OutboxTable(
        "pending_balance_changes",
        queries.TAKE_PENDING_BALANCE_CHANGE_SIGNALS,
        pending_balance_change,
        "creditor_id",
        ("debtor_id", "other_creditor_id", "change_id"),
        shard_checked=False,
    ),
)
TABLES_BY_NAME = {table.name: table for table in TABLES}
