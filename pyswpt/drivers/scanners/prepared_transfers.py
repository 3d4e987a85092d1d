"""The prepared-transfers scanner (`pyswpt run scan-prepared-transfers`, spec 02 §2.13, §4.5).

Re-sends PreparedTransfer for this shard's transfers that have waited longer
than max(APP_PREPARED_TRANSFER_REMAINDER_DAYS, APP_MESSAGE_MAX_DELAY_DAYS),
once per that interval. One pass over the table takes APP_PREPARED_TRANSFERS_SCAN_DAYS.
"""

from __future__ import annotations

import datetime as dt

import psycopg

from pyswpt import queries
from pyswpt.config import SECONDS_IN_DAY, Config
from pyswpt.drivers.scanners import engine
from pyswpt.transactions import with_retries


class PreparedTransfersScanner:
    table_name = "prepared_transfer"
    read_keys_query = queries.READ_PREPARED_TRANSFER_KEYS

    def __init__(self, config: Config):
        self.config = config

    def steps(self) -> list[engine.Step]:
        return [self.send_reminders]

    def send_reminders(self, conn: psycopg.Connection, keys: list[engine.Key], now: dt.datetime) -> int:
        """Send the due reminders among `keys`; return how many were sent."""
        config = self.config
        realm = config.realm
        debtor_ids, sender_creditor_ids, transfer_ids = (list(column) for column in zip(*keys, strict=True))
        params = {
            "debtor_ids": debtor_ids,
            "sender_creditor_ids": sender_creditor_ids,
            "transfer_ids": transfer_ids,
            "prepared_transfer_remainder_days": config.prepared_transfer_remainder_days,
            "message_max_delay_days": config.message_max_delay_days,
            "realm_mask": realm.mask,
            "realm": realm.realm,
            "now": now,
        }
        return with_retries(conn, lambda c: c.execute(queries.SEND_PREPARED_TRANSFER_REMINDERS, params).fetchone()[0])

    def keep_alive(self) -> None:
        pass

    def close(self) -> None:
        pass


def pace(config: Config) -> engine.Pace:
    return engine.Pace(
        pass_seconds=config.prepared_transfers_scan_days * SECONDS_IN_DAY,
        beat_milliseconds=config.prepared_transfers_scan_beat_milliseconds,
        blocks_per_query=config.prepared_transfers_scan_blocks_per_query,
    )


def run(config: Config) -> int:
    return engine.run_scanners(config, [scanner_and_pace(config)])


def scanner_and_pace(config: Config) -> tuple[engine.TableScanner, engine.Pace]:
    return PreparedTransfersScanner(config), pace(config)
