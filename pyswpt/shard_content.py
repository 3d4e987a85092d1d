"""`pyswpt verify-shard-content` (spec 01 §4.5): does any record belong to another shard?

Run after a shard split, before DELETE_PARENT_SHARD_RECORDS is turned off.
The tables are walked a few heap blocks per query, each query its own short
transaction, pausing APP_VERIFY_SHARD_SLEEP_SECONDS every
APP_VERIFY_SHARD_YIELD_PER rows so that a busy shard is not slowed down. The
check itself is the SQL function find_record_outside_shard.
"""

from __future__ import annotations

import logging
import time

import psycopg

from pyswpt import db, progress, queries
from pyswpt.config import Config
from pyswpt.transactions import with_retries

logger = logging.getLogger(__name__)

BLOCKS_PER_QUERY = 64
FOREIGN_RECORD_FOUND = "At least one record has been found that does not belong to the shard."


def verify_shard_content(config: Config) -> int:
    """0 when every checked record belongs to this shard; 1 (and an error line) at the first that does not."""
    with db.connect(config.operator_postgres_url, application_name="pyswpt verify-shard-content") as conn:
        tables = with_retries(conn, lambda c: c.execute(queries.LIST_SHARD_CONTENT_TABLES).fetchall())
        total_blocks = sum(block_count for _, block_count in tables)
        shown = progress.track("verify-shard-content", total_blocks, " blocks", config.progress_interval_seconds)
        with shown as blocks_done:
            return verify_tables(conn, config, tables, blocks_done)


def verify_tables(
    conn: psycopg.Connection, config: Config, tables: list[tuple[str, int]], blocks_done: progress.Progress
) -> int:
    """Walk the tables block range by block range; 1 at the first record outside the shard, else 0."""
    realm = config.realm
    rows_since_pause = 0
    for table_name, block_count in tables:
        for first_block in range(0, block_count, BLOCKS_PER_QUERY):
            params = {
                "table_name": table_name,
                "first_block": first_block,
                "block_count": BLOCKS_PER_QUERY,
                "realm_mask": realm.mask,
                "realm": realm.realm,
            }
            checked, debtor_id, creditor_id = with_retries(
                conn, lambda c, params=params: c.execute(queries.FIND_RECORD_OUTSIDE_SHARD, params).fetchone()
            )
            if debtor_id is not None:
                logger.error(
                    "%s First found: table %s, account (%d, %d).",
                    FOREIGN_RECORD_FOUND,
                    table_name,
                    debtor_id,
                    creditor_id,
                )
                return 1
            blocks_done.update(min(BLOCKS_PER_QUERY, block_count - first_block))
            pauses, rows_since_pause = divmod(rows_since_pause + checked, config.verify_shard_yield_per)
            if pauses:
                time.sleep(pauses * config.verify_shard_sleep_seconds)
    return 0
