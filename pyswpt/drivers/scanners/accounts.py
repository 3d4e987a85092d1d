"""The accounts scanner (`pyswpt run scan-accounts`, spec 02 §4.4, spec 01 §5).

For each beat's accounts, in order, each step in its own transaction:
1. with DELETE_PARENT_SHARD_RECORDS, delete the accounts left over from the
   parent shard (no message), and, once a pass, the sibling shard's parked
   messages;
2. purge accounts deleted long ago (AccountPurge);
3. heartbeats and pending AccountUpdates;
4. publish TryToDeleteAccount chores;
5. publish CapitalizeInterest chores;
6. publish ChangeInterestRate / UpdateDebtorInfo chores that align accounts
   with their debtor's root config, obtained for all of the beat's debtors at
   once: from this database when this shard owns the root account, else from
   the fetch API (concurrently, cached for two hours).
Which rows qualify is decided by the SQL functions; this module passes the
settings and the time, and publishes the chores (outside any transaction: the
chore handlers re-check everything). One pass takes APP_ACCOUNTS_SCAN_HOURS.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import time

import psycopg

from pyswpt import queries
from pyswpt.chores import ChoresPublisher
from pyswpt.config import Config
from pyswpt.drivers.scanners import engine
from pyswpt.fetch import FetchClient, FetchError
from pyswpt.messages import CapitalizeInterest, ChangeInterestRate, TryToDeleteAccount, UpdateDebtorInfo
from pyswpt.transactions import at_read_committed, with_retries

logger = logging.getLogger(__name__)

SECONDS_IN_HOUR = 3600
ROOT_CREDITOR_ID = 0
# Concurrent fetch API requests of one beat, at most (and APP_FETCH_CONNECTIONS).
MAX_FETCH_THREADS = 32
# Parked messages of the sibling shard forgotten per beat, at most.
PARKED_DELETIONS_PER_BEAT = 1000


class AccountsScanner:
    table_name = "account"
    read_keys_query = queries.READ_ACCOUNT_KEYS

    def __init__(self, config: Config, publisher: ChoresPublisher, fetch: FetchClient | None):
        self.config = config
        self.publisher = publisher
        self.fetch = fetch
        self._fetch_pool = concurrent.futures.ThreadPoolExecutor(
            min(MAX_FETCH_THREADS, config.fetch_connections), thread_name_prefix="fetch"
        )
        self._warned_about_fetch_url = False
        # Monotonic time when the sibling's parked messages are looked for next: at once, then once a pass.
        self._parked_deletion_due_at = float("-inf")

    def steps(self) -> list[engine.Step]:
        steps: list[engine.Step] = [self.purge_deleted_accounts, self.send_heartbeats]
        if self.config.delete_parent_shard_records:
            steps[:0] = [self.delete_parent_shard_accounts, self.delete_parent_shard_parked_messages]
        return [*steps, self.publish_account_chores, self.publish_debtor_settings_chores]

    def delete_parent_shard_accounts(self, conn: psycopg.Connection, keys: list[engine.Key], now: dt.datetime) -> int:
        """Step 1 (with DELETE_PARENT_SHARD_RECORDS); a removal, not a clock matter: `now` is not used."""
        realm = self.config.realm
        debtor_ids, creditor_ids = key_columns(keys)
        params = {
            "debtor_ids": debtor_ids,
            "creditor_ids": creditor_ids,
            "realm_mask": realm.mask,
            "realm": realm.realm,
            "parent_realm_mask": realm.parent_mask,
            "parent_realm": realm.parent_realm,
        }
        return self.call(conn, queries.DELETE_PARENT_SHARD_ACCOUNTS, params)

    def delete_parent_shard_parked_messages(
        self, conn: psycopg.Connection, keys: list[engine.Key], now: dt.datetime
    ) -> int:
        """Step 1 too: the sibling's parked messages, not tied to the beat's keys; looked for once a pass
        (a full read of parked_message), and on every beat while a beat's worth is found."""
        if time.monotonic() < self._parked_deletion_due_at:
            return 0
        realm = self.config.realm
        params = {
            "realm_mask": realm.mask,
            "realm": realm.realm,
            "parent_realm_mask": realm.parent_mask,
            "parent_realm": realm.parent_realm,
            "max_count": PARKED_DELETIONS_PER_BEAT,
        }
        deleted = self.call(conn, queries.DELETE_PARENT_SHARD_PARKED_MESSAGES, params)
        if deleted < PARKED_DELETIONS_PER_BEAT:
            self._parked_deletion_due_at = time.monotonic() + self.config.accounts_scan_hours * SECONDS_IN_HOUR
        if deleted:
            logger.info("Deleted %d parked messages of the sibling shard.", deleted)
        return deleted

    def purge_deleted_accounts(self, conn: psycopg.Connection, keys: list[engine.Key], now: dt.datetime) -> int:
        """Step 2: AccountPurge for accounts deleted long ago."""
        config = self.config
        debtor_ids, creditor_ids = key_columns(keys)
        params = {
            "debtor_ids": debtor_ids,
            "creditor_ids": creditor_ids,
            "intranet_extreme_delay_days": config.intranet_extreme_delay_days,
            "prepared_transfer_max_delay_days": config.prepared_transfer_max_delay_days,
            "realm_mask": config.realm.mask,
            "realm": config.realm.realm,
            "now": now,
        }
        return self.call(conn, queries.PURGE_DELETED_ACCOUNTS, params)

    def send_heartbeats(self, conn: psycopg.Connection, keys: list[engine.Key], now: dt.datetime) -> int:
        """Step 3: heartbeats and pending AccountUpdates."""
        config = self.config
        debtor_ids, creditor_ids = key_columns(keys)
        params = {
            "debtor_ids": debtor_ids,
            "creditor_ids": creditor_ids,
            "account_heartbeat_days": config.account_heartbeat_days,
            "message_max_delay_days": config.message_max_delay_days,
            "realm_mask": config.realm.mask,
            "realm": config.realm.realm,
            "now": now,
        }
        # The beat's accounts may be ones the workers are busy changing.
        return self.call(conn, queries.SEND_ACCOUNT_HEARTBEATS, params, read_committed=True)

    def publish_account_chores(self, conn: psycopg.Connection, keys: list[engine.Key], now: dt.datetime) -> None:
        """Steps 4 and 5: deletion attempts, then capitalizations, one batch each."""
        config = self.config
        debtor_ids, creditor_ids = key_columns(keys)
        params = {
            "debtor_ids": debtor_ids,
            "creditor_ids": creditor_ids,
            "deletion_attempts_min_days": config.deletion_attempts_min_days,
            "min_interest_capitalization_days": config.min_interest_capitalization_days,
            "max_interest_to_principal_ratio": config.max_interest_to_principal_ratio,
            "now": now,
        }
        rows = with_retries(conn, lambda c: c.execute(queries.SELECT_ACCOUNT_CHORES, params).fetchall())
        self.publisher.publish([TryToDeleteAccount(d, c) for d, c, deletion, _ in rows if deletion])
        self.publisher.publish([CapitalizeInterest(d, c) for d, c, _, capitalization in rows if capitalization])

    def publish_debtor_settings_chores(
        self, conn: psycopg.Connection, keys: list[engine.Key], now: dt.datetime
    ) -> None:
        """Step 6: rate and debtor-info chores from the debtors' root configs, one batch."""
        debtor_ids, creditor_ids = key_columns(keys)
        debtors = sorted({d for d, c in zip(debtor_ids, creditor_ids, strict=True) if c != ROOT_CREDITOR_ID})
        if not debtors:
            return
        root_configs = self.root_configs(conn, debtors)
        params = {
            "debtor_ids": debtor_ids,
            "creditor_ids": creditor_ids,
            "root_debtor_ids": list(root_configs),
            "root_config_data": list(root_configs.values()),
            "message_max_delay_days": self.config.message_max_delay_days,
            "now": now,
        }
        rows = with_retries(conn, lambda c: c.execute(queries.SELECT_DEBTOR_SETTINGS_CHORES, params).fetchall())
        chores: list[ChangeInterestRate | UpdateDebtorInfo] = []
        for debtor_id, creditor_id, interest_rate, needs_info_update, iri, content_type, sha256 in rows:
            if interest_rate is not None:
                chores.append(ChangeInterestRate(debtor_id, creditor_id, interest_rate, now))
            if needs_info_update:
                chores.append(
                    UpdateDebtorInfo(
                        debtor_id,
                        creditor_id,
                        iri or "",
                        content_type or "",
                        bytes(sha256).hex().upper() if sha256 is not None else "",
                        now,
                    )
                )
        self.publisher.publish(chores)

    def root_configs(self, conn: psycopg.Connection, debtor_ids: list[int]) -> dict[int, str]:
        """The root config_data of each debtor for which one could be obtained."""
        realm = self.config.realm
        local = [d for d in debtor_ids if realm.owns(d, ROOT_CREDITOR_ID)]
        remote = [d for d in debtor_ids if not realm.owns(d, ROOT_CREDITOR_ID)]
        configs: dict[int, str | None] = {}
        if local:
            params = {"debtor_ids": local}
            configs.update(with_retries(conn, lambda c: c.execute(queries.GET_ROOT_CONFIGS_DATA, params).fetchall()))
        if remote:
            configs.update(zip(remote, self._fetch_pool.map(self.fetch_root_config, remote), strict=True))
        return {debtor_id: data for debtor_id, data in configs.items() if data is not None}

    def fetch_root_config(self, debtor_id: int) -> str | None:
        """Through the fetch API; an error means "no config this time" (spec 01 §6.3)."""
        if self.fetch is None:
            if not self._warned_about_fetch_url:
                logger.error("FETCH_API_URL is not set: root configs of other shards cannot be fetched.")
                self._warned_about_fetch_url = True
            return None
        try:
            return self.fetch.root_config_data(debtor_id)
        except FetchError:
            logger.exception("Caught error while making a fetch request.")
            return None

    def call(
        self, conn: psycopg.Connection, query: str, params: dict[str, object], *, read_committed: bool = False
    ) -> int:
        """One call in a transaction of its own, retried; at READ COMMITTED when asked (at_read_committed)."""

        def in_transaction(c: psycopg.Connection) -> int:
            if read_committed:
                at_read_committed(c)
            return c.execute(query, params).fetchone()[0]

        return with_retries(conn, in_transaction)

    def keep_alive(self) -> None:
        self.publisher.keep_alive()

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.publisher.close()


def key_columns(keys: list[engine.Key]) -> tuple[list[int], list[int]]:
    """The debtor ids and the creditor ids of account keys, as the SQL functions take them."""
    return [debtor_id for debtor_id, _ in keys], [creditor_id for _, creditor_id in keys]


def pace(config: Config) -> engine.Pace:
    return engine.Pace(
        pass_seconds=config.accounts_scan_hours * SECONDS_IN_HOUR,
        beat_milliseconds=config.accounts_scan_beat_milliseconds,
        blocks_per_query=config.accounts_scan_blocks_per_query,
    )


def fetch_client(config: Config) -> FetchClient | None:
    if not config.fetch_api_url:
        return None
    return FetchClient(
        config.fetch_api_url,
        timeout_seconds=config.fetch_api_timeout_seconds,
        cache_size=config.fetch_data_cache_size,
    )


def run(config: Config) -> int:
    return engine.run_scanners(config, [scanner_and_pace(config)])


def scanner_and_pace(config: Config) -> tuple[engine.TableScanner, engine.Pace]:
    publisher = ChoresPublisher(config.chores_broker_url, config.chores_broker_queue)
    return AccountsScanner(config, publisher, fetch_client(config)), pace(config)
