"""The archive scanner (`pyswpt run scan-registered-balance-changes`, spec 02 §2.14, §4.5).

Forgets applied balance changes committed before REMOVE_FROM_ARCHIVE_THRESHOLD_DATE
(the intake refuses changes that old, so none can be applied twice). One pass
over the archive takes APP_REGISTERED_BALANCE_CHANGES_SCAN_DAYS.
"""

from __future__ import annotations

import datetime as dt

import psycopg

from pyswpt import queries
from pyswpt.config import SECONDS_IN_DAY, Config
from pyswpt.drivers.scanners import engine
from pyswpt.transactions import with_retries


class RegisteredBalanceChangesScanner:
    table_name = "registered_balance_change"
    read_keys_query = queries.READ_REGISTERED_BALANCE_CHANGE_KEYS

    def __init__(self, config: Config):
        self.config = config

    def steps(self) -> list[engine.Step]:
        return [self.delete_applied_changes]

    def delete_applied_changes(self, conn: psycopg.Connection, keys: list[engine.Key], now: dt.datetime) -> int:
        """Delete the old applied changes among `keys`; return how many. The threshold is a
        setting, not a clock reading, so `now` is not used."""
        debtor_ids, other_creditor_ids, change_ids = (list(column) for column in zip(*keys, strict=True))
        params = {
            "debtor_ids": debtor_ids,
            "other_creditor_ids": other_creditor_ids,
            "change_ids": change_ids,
            "archive_threshold": self.config.remove_from_archive_threshold_date,
        }
        return with_retries(conn, lambda c: c.execute(queries.DELETE_APPLIED_BALANCE_CHANGES, params).fetchone()[0])

    def keep_alive(self) -> None:
        pass

    def close(self) -> None:
        pass


def pace(config: Config) -> engine.Pace:
    return engine.Pace(
        pass_seconds=config.registered_balance_changes_scan_days * SECONDS_IN_DAY,
        beat_milliseconds=config.registered_balance_changes_scan_beat_milliseconds,
        blocks_per_query=config.registered_balance_changes_scan_blocks_per_query,
    )


def run(config: Config) -> int:
    return engine.run_scanners(config, [scanner_and_pace(config)])


def scanner_and_pace(config: Config) -> tuple[engine.TableScanner, engine.Pace]:
    return RegisteredBalanceChangesScanner(config), pace(config)
