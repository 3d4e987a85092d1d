"""Request workers (`pyswpt run workers`): run the per-account batch processors.

Three loops — transfer requests, finalization requests, balance changes —
each list the accounts that have queued work and run that account's SQL batch
processor in a pool of threads (one connection per thread). A loop wakes when
the consumer's transaction NOTIFYs that rows arrived, and polls at least every
APP_PROCESS_*_WAIT seconds. Within a loop an account is never processed by two
threads at once; across processes, SKIP LOCKED and the account lock keep the
work disjoint.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from pyswpt import db
from pyswpt.config import Config
from pyswpt.processes import join_threads, stop_event_on_signals
from pyswpt.transactions import with_retries

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "pyswpt_requests"

Key = tuple[int, int]


class ForeignAccountError(Exception):
    """Queued work for an account that neither this shard nor its parent owns."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # as in the process_<name> commands
    table: str  # the queue table whose NOTIFY wakes this stage
    list_function: str
    threads: int
    wait_seconds: float
    max_count: int
    process: Callable[[psycopg.Connection, Key], object]


def stages(config: Config) -> list[Stage]:
    def process_transfer_requests(conn: psycopg.Connection, key: Key) -> object:
        return conn.execute(
            "SELECT pyswpt.process_transfer_requests(%s, %s, %s)", (*key, config.commit_period_seconds)
        )

    def process_finalization_requests(conn: psycopg.Connection, key: Key) -> object:
        return conn.execute(
            "SELECT pyswpt.process_finalization_requests(%s, %s, %s)", (*key, ignore_all(config, key))
        )

    def process_balance_changes(conn: psycopg.Connection, key: Key) -> object:
        return conn.execute("SELECT pyswpt.process_balance_changes(%s, %s)", key)

    return [
        Stage(
            "transfer_requests",
            "transfer_request",
            "list_transfer_request_senders",
            config.process_transfer_requests_threads,
            config.process_transfer_requests_wait_seconds,
            config.process_transfer_requests_max_count,
            process_transfer_requests,
        ),
        Stage(
            "finalization_requests",
            "finalization_request",
            "list_finalization_request_senders",
            config.process_finalization_requests_threads,
            config.process_finalization_requests_wait_seconds,
            config.process_finalization_requests_max_count,
            process_finalization_requests,
        ),
        Stage(
            "balance_changes",
            "pending_balance_change",
            "list_accounts_with_pending_balance_changes",
            config.process_balance_changes_threads,
            config.process_balance_changes_wait_seconds,
            config.process_balance_changes_max_count,
            process_balance_changes,
        ),
    ]


def ignore_all(config: Config, key: Key) -> bool:
    """Finalizations of a parent shard's account are dropped after a split (spec 01 §4.3)."""
    if config.realm.owns(*key):
        return False
    if config.delete_parent_shard_records and config.realm.parent_owns(*key):
        return True
    raise ForeignAccountError(f"finalization requests for account {key} that this shard does not own")


def run(config: Config, stage_names: list[str] | None = None) -> int:
    """Run the named stages (all by default) in threads of this process until stopped."""
    stopping = stop_event_on_signals()
    selected = [stage for stage in stages(config) if stage_names is None or stage.name in stage_names]
    failures: list[BaseException] = []

    def run_stage(stage: Stage) -> None:
        try:
            process_until_stopped(config, stage, stopping)
        except BaseException as error:  # noqa: BLE001 - reported below, then the process exits
            logger.exception("Caught error while processing %s.", stage.name)
            failures.append(error)
            stopping.set()

    loops = [threading.Thread(target=run_stage, args=(stage,), name=stage.name) for stage in selected]
    for loop in loops:
        loop.start()
    join_threads(loops)
    return 1 if failures else 0


def process_until_stopped(config: Config, stage: Stage, stopping: threading.Event) -> None:
    local = threading.local()
    connections: list[psycopg.Connection] = []

    def connection() -> psycopg.Connection:
        if not hasattr(local, "conn"):
            local.conn = db.connect(config.postgres_url, application_name=f"pyswpt {stage.name}")
            connections.append(local.conn)
        return local.conn

    def process(key: Key) -> None:
        with_retries(connection(), lambda conn: stage.process(conn, key))

    listener = db.listen(config.postgres_url, NOTIFY_CHANNEL, application_name=f"pyswpt {stage.name} listen")
    try:
        with concurrent.futures.ThreadPoolExecutor(stage.threads, thread_name_prefix=stage.name) as pool:
            while not stopping.is_set():
                round_started = time.monotonic()
                keys = list_keys(listener, stage)
                # list() re-raises the first failure of the round.
                list(pool.map(process, keys))
                if len(keys) < stage.max_count:
                    db.wait_for_notification(listener, round_started + stage.wait_seconds, stopping, stage.table)
    finally:
        listener.close()
        for conn in connections:
            conn.close()


def list_keys(listener: psycopg.Connection, stage: Stage) -> list[Key]:
    query = sql.SQL("SELECT debtor_id, creditor_id FROM pyswpt.{}(%s)").format(sql.Identifier(stage.list_function))
    return [tuple(row) for row in listener.execute(query, (stage.max_count,)).fetchall()]
