"""Request workers (`pyswpt run workers`): run the per-account batch processors.

Three loops — transfer requests, finalization requests, balance changes —
each list the accounts that have queued work and run that account's SQL batch
processor in up to PROCESS_*_THREADS threads (one connection per thread): the
stage's own thread, and as many of a pool of the others as it needs to end a
round within 20 ms more (process_round). A thread takes up to ACCOUNTS_PER_CALL
accounts at a time and processes them with one call of a procedure that
commits each account's transaction before the next; when that call fails, the
accounts go one by one. A loop wakes when the consumer's
transaction NOTIFYs that rows arrived, and polls at least every
APP_PROCESS_*_WAIT seconds; the loops share one LISTEN connection
(db.SharedListener). Within a loop an account is never processed by two
threads at once; across processes, SKIP LOCKED and the account lock keep the
work disjoint. Beside the balance-changes loop runs the loop of prompt
AccountUpdates (account_updates.py).

Failures are isolated per account: when one account's processing fails for
any reason but the infrastructure's (a CHECK violation, a RAISE, a statement
timeout...), the account is logged in one line and left alone for a while
(backoff per account, kept in memory), and the stage serves the others. An
infrastructure error (lost connection, server shutting down, missing
function...) makes the stage reconnect with backoff. No error ends a stage,
and a stage in trouble never stops the others, except a SQL API that stays
missing past APP_API_WAIT_SECONDS (pyswpt.upgrades): then the process exits.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import psycopg

from pyswpt import db, metrics, queries
from pyswpt.backoff import Backoff
from pyswpt.config import Config
from pyswpt.drivers import account_updates
from pyswpt.processes import join_threads, stop_event_on_signals
from pyswpt.transactions import SqlCall, describe_error, execute_with_retries, is_infrastructure_error
from pyswpt.upgrades import ApiUnavailable, ApiWait

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "pyswpt_requests"
# An account whose processing failed is tried again after these pauses
# (doubling up to ten minutes), until it succeeds.
ACCOUNT_RETRY_PAUSES_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 600.0)
# Accounts remembered as failing, per stage, at most; past it the one due
# soonest is forgotten (it is merely tried again early).
MAX_ACCOUNTS_IN_BACKOFF = 10_000
# The list functions take an SQL integer.
MAX_SQL_INTEGER = 2**31 - 1
# The accounts of a round wait this long at most for the stage's own thread, before the
# pool's threads take them (process_round): about what one account's processing takes.
HOLD_BACK_SECONDS = 0.02
# A thread of a round takes this many accounts at most at a time, and processes them
# with one call (each account in a transaction of its own): a statement and its round
# trip cost about 0.1 ms of the driver's and the server's CPU, and a call pays it once
# for all its accounts (measured: eight saved more than four, end to end). A call of
# quick accounts still ends within the hold-back (on two busy cores, about 1–1.5 ms an
# account, from rounds per second and accounts per round), so a round's pace and a
# stuck account show there as they did one account at a time.
ACCOUNTS_PER_CALL = 8
# Rounds of the balance-changes stage start at least this far apart. A committed
# transfer queues its recipient's change at once and NOTIFYs; without a gap a busy
# recipient (a merchant) is locked, updated and announced once per transfer. With
# it, the changes of a few dozen milliseconds are applied together, as they were
# when each came through the broker and the consumer's windows.
BALANCE_CHANGES_ROUND_GAP_SECONDS = 0.02

Key = tuple[int, int]


class ForeignAccountError(Exception):
    """Queued work for an account that neither this shard nor its parent owns."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # as in the process_<name> commands
    table: str  # the queue table whose NOTIFY wakes this stage
    list_query: str  # from pyswpt.queries: the accounts with queued work, at most %(max_count)s
    threads: int
    wait_seconds: float
    max_count: int
    process: Callable[[Key], SqlCall]  # the call of the account's batch processor
    process_in_turn: Callable[[list[Key]], SqlCall]  # the same for several, each in a transaction of its own
    round_gap_seconds: float = 0.0  # a round starts at least this long after the previous one


def stages(config: Config) -> list[Stage]:
    def process_transfer_requests(key: Key) -> SqlCall:
        debtor_id, creditor_id = key
        params = {
            "debtor_id": debtor_id,
            "sender_creditor_id": creditor_id,
            "commit_period_seconds": config.commit_period_seconds,
        }
        return SqlCall(queries.PROCESS_TRANSFER_REQUESTS, params)

    def process_finalization_requests(key: Key) -> SqlCall:
        debtor_id, creditor_id = key
        params = {
            "debtor_id": debtor_id,
            "sender_creditor_id": creditor_id,
            "ignore_all": ignore_all(config, key),
            # Recipients in this realm get their balance changes without a trip through the broker.
            "realm_mask": config.realm.mask,
            "realm": config.realm.realm,
        }
        return SqlCall(queries.PROCESS_FINALIZATION_REQUESTS, params)

    def process_balance_changes(key: Key) -> SqlCall:
        debtor_id, creditor_id = key
        return SqlCall(queries.PROCESS_BALANCE_CHANGES, {"debtor_id": debtor_id, "creditor_id": creditor_id})

    def process_transfer_requests_in_turn(keys: list[Key]) -> SqlCall:
        debtor_ids, creditor_ids = key_columns(keys)
        params = {
            "debtor_ids": debtor_ids,
            "sender_creditor_ids": creditor_ids,
            "commit_period_seconds": config.commit_period_seconds,
            "lock_timeout_ms": in_turn_lock_timeout_ms(),
        }
        return SqlCall(queries.PROCESS_TRANSFER_REQUESTS_IN_TURN, params)

    def process_finalization_requests_in_turn(keys: list[Key]) -> SqlCall:
        debtor_ids, creditor_ids = key_columns(keys)
        params = {
            "debtor_ids": debtor_ids,
            "sender_creditor_ids": creditor_ids,
            "ignore_all": [ignore_all(config, key) for key in keys],
            "realm_mask": config.realm.mask,
            "realm": config.realm.realm,
            "lock_timeout_ms": in_turn_lock_timeout_ms(),
        }
        return SqlCall(queries.PROCESS_FINALIZATION_REQUESTS_IN_TURN, params)

    def process_balance_changes_in_turn(keys: list[Key]) -> SqlCall:
        debtor_ids, creditor_ids = key_columns(keys)
        params = {
            "debtor_ids": debtor_ids,
            "creditor_ids": creditor_ids,
            "lock_timeout_ms": in_turn_lock_timeout_ms(),
        }
        return SqlCall(queries.PROCESS_BALANCE_CHANGES_IN_TURN, params)

    return [
        Stage(
            "transfer_requests",
            "transfer_request",
            queries.LIST_TRANSFER_REQUEST_SENDERS,
            config.process_transfer_requests_threads,
            config.process_transfer_requests_wait_seconds,
            config.process_transfer_requests_max_count,
            process_transfer_requests,
            process_transfer_requests_in_turn,
        ),
        Stage(
            "finalization_requests",
            "finalization_request",
            queries.LIST_FINALIZATION_REQUEST_SENDERS,
            config.process_finalization_requests_threads,
            config.process_finalization_requests_wait_seconds,
            config.process_finalization_requests_max_count,
            process_finalization_requests,
            process_finalization_requests_in_turn,
        ),
        Stage(
            "balance_changes",
            "pending_balance_change",
            queries.LIST_ACCOUNTS_WITH_PENDING_BALANCE_CHANGES,
            config.process_balance_changes_threads,
            config.process_balance_changes_wait_seconds,
            config.process_balance_changes_max_count,
            process_balance_changes,
            process_balance_changes_in_turn,
            BALANCE_CHANGES_ROUND_GAP_SECONDS,
        ),
    ]


def key_columns(keys: list[Key]) -> tuple[list[int], list[int]]:
    """The debtor ids and the creditor ids of `keys`, two arrays as the procedures take them."""
    return [debtor_id for debtor_id, _ in keys], [creditor_id for _, creditor_id in keys]


def in_turn_lock_timeout_ms() -> int:
    """How long an account of a call of several may wait for its lock: the hold-back.

    The accounts after it in the call wait with it, where one at a time the
    pool's threads would have taken them after the hold-back. When it waits
    longer, the call fails, and every account of it goes alone, with the
    session's lock timeout.
    """
    return math.ceil(HOLD_BACK_SECONDS * 1000)


def call_in_turn(conn: psycopg.Connection, call: SqlCall) -> None:
    """Run a call of several accounts. When it fails, first send the NOTIFYs that its
    committed transactions held back for the call's last one, which did not commit
    (45_work_queues.sql): the flusher and the stages must hear of their rows."""
    try:
        conn.execute(call.query, call.params)
    except Exception:
        if not conn.broken:
            conn.execute(queries.SEND_HELD_NOTIFICATIONS)
        raise


def process_in_turn_or_alone(
    keys: list[Key], processed_in_turn: Callable[[list[Key]], bool], process_alone: Callable[[Key], None]
) -> None:
    """The accounts with one call, or each alone if there is one or the call failed.

    After a failed call the accounts after the one that failed were not begun,
    and those before it are done (alone, they find nothing queued): the last go
    first, so that none waits behind the one that failed, which may wait for its
    lock again.
    """
    if len(keys) == 1 or not processed_in_turn(keys):
        for key in reversed(keys):
            process_alone(key)


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
    logger.info(
        "Starting the workers: %s.",
        ", ".join(f"{stage.name} with threads {stage.threads}" for stage in selected),
    )
    failures: list[BaseException] = []
    listener = db.SharedListener(
        config.driver_postgres_url,
        NOTIFY_CHANNEL,
        [stage.table for stage in selected],
        application_name="pyswpt workers listen",
    )

    def run_stage(stage: Stage) -> None:
        try:
            process_until_stopped(config, stage, listener, stopping)
        except ApiUnavailable as error:  # logged in one line where the process exits
            failures.append(error)
            stopping.set()
        except BaseException as error:  # noqa: BLE001 - not an Exception (stages outlive those): exit
            logger.exception("Caught error while processing %s.", stage.name)
            failures.append(error)
            stopping.set()

    loops = [threading.Thread(target=run_stage, args=(stage,), name=stage.name) for stage in selected]
    loops.append(threading.Thread(target=listener.run_until_stopped, args=(stopping,), name="listener"))
    # Accounts change in the balance-change and finalization stages; the
    # process that applies balance changes also announces them promptly.
    if any(stage.name == "balance_changes" for stage in selected):
        loops.append(
            threading.Thread(
                target=account_updates.announce_until_stopped, args=(config, stopping), name="account_updates"
            )
        )
    for loop in loops:
        loop.start()
    join_threads(loops)
    for failure in failures:
        if isinstance(failure, ApiUnavailable):
            raise failure
    return 1 if failures else 0


class AccountBackoff:
    """The accounts of one stage whose processing failed, and when each is due again.

    Shared by the stage's pool threads, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> (failures in a row, time.monotonic() when it may be tried again)
        self._failures: dict[Key, tuple[int, float]] = {}

    def failed(self, key: Key, now: float) -> float:
        """Remember one more failure of `key`; return the pause before it is tried again."""
        with self._lock:
            failures_in_a_row = self._failures.get(key, (0, now))[0] + 1
            if key not in self._failures and len(self._failures) >= MAX_ACCOUNTS_IN_BACKOFF:
                del self._failures[min(self._failures, key=lambda k: self._failures[k][1])]
            pause = ACCOUNT_RETRY_PAUSES_SECONDS[min(failures_in_a_row, len(ACCOUNT_RETRY_PAUSES_SECONDS)) - 1]
            self._failures[key] = (failures_in_a_row, now + pause)
            return pause

    def succeeded(self, key: Key) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def waiting(self, now: float) -> set[Key]:
        """The accounts that must not be tried before a later time."""
        with self._lock:
            return {key for key, (_, due) in self._failures.items() if due > now}


def process_until_stopped(config: Config, stage: Stage, listener: db.SharedListener, stopping: threading.Event) -> None:
    """Serve `stage` until stopped, reconnecting with backoff after any error that escapes a round.

    Raises ApiUnavailable when the stage's SQL API stays missing too long.
    """
    accounts_backoff = AccountBackoff()
    reconnect_backoff = Backoff()
    api_wait = ApiWait(config.api_wait_seconds, f"the {stage.name} stage of the workers")
    while not stopping.is_set():
        try:
            serve_stage(config, stage, listener, accounts_backoff, api_wait, stopping)
        except Exception as error:  # noqa: BLE001 - a stage must outlive any error (logged)
            api_wait.failed(error)
            pause = reconnect_backoff.next_pause()
            if isinstance(error, psycopg.Error):
                logger.error(
                    "The %s stage failed (%s); reconnecting in %.0f s.", stage.name, describe_error(error), pause
                )
            else:
                logger.exception("The %s stage failed; restarting it in %.0f s.", stage.name, pause)
            stopping.wait(pause)


def serve_stage(
    config: Config,
    stage: Stage,
    listener: db.SharedListener,
    backoff: AccountBackoff,
    api_wait: ApiWait,
    stopping: threading.Event,
) -> None:
    """Rounds of the stage on fresh connections, until stopped or an infrastructure error."""
    local = threading.local()
    connections: list[psycopg.Connection] = []

    def connection() -> psycopg.Connection:
        if not hasattr(local, "conn"):
            # Asynchronous commits: the flusher makes them durable before their outbox rows leave (pyswpt.db).
            local.conn = db.connect(
                config.driver_postgres_url, application_name=f"pyswpt {stage.name}", asynchronous_commit=True
            )
            # A batch processor is one statement: in autocommit it is its own
            # transaction, without the round trips of BEGIN and COMMIT.
            local.conn.autocommit = True
            connections.append(local.conn)
        return local.conn

    def process(keys: list[Key]) -> None:
        process_in_turn_or_alone(keys, processed_in_turn, process_alone)

    def processed_in_turn(keys: list[Key]) -> bool:
        """Whether one call processed every account; if it failed, some may be done, some not."""
        try:
            call_in_turn(connection(), stage.process_in_turn(keys))
        except Exception as error:  # noqa: BLE001 - anything but the infrastructure: the accounts go alone
            if is_infrastructure_error(error):
                raise
            metrics.WORKER_CALLS_SPLIT.labels(stage.name).inc()
            logger.info(
                "A call of %s for %d accounts failed (%s); processing them one at a time.",
                stage.name,
                len(keys),
                describe_error(error),
            )
            return False
        for key in keys:
            backoff.succeeded(key)
        return True

    def process_alone(key: Key) -> None:
        try:
            execute_with_retries(connection(), stage.process(key))
        except Exception as error:  # noqa: BLE001 - anything but the infrastructure is the account's
            if is_infrastructure_error(error):
                raise
            pause = backoff.failed(key, time.monotonic())
            metrics.WORKER_ACCOUNT_FAILURES.labels(stage.name).inc()
            logger.warning(
                "Skipped %s of account debtor_id=%d creditor_id=%d (%s); retrying in %.0f s.",
                stage.name,
                *key,
                describe_error(error),
                pause,
                extra={
                    "stage": stage.name,
                    "debtor_id": key[0],
                    "creditor_id": key[1],
                    "sqlstate": getattr(error, "sqlstate", None),
                },
            )
        else:
            backoff.succeeded(key)

    lister = db.connect(config.driver_postgres_url, application_name=f"pyswpt {stage.name} list")
    lister.autocommit = True  # its queries are single statements, and it must not sit in a transaction
    try:
        with pool_beside(stage) as pool:
            while not stopping.is_set():
                round_started = time.monotonic()
                listener.forget(stage.table)
                keys = list_keys(lister, stage, backoff.waiting(round_started))
                if process_round(pool, stage.threads - 1, process, keys, ACCOUNTS_PER_CALL):
                    metrics.WORKER_ROUNDS_HELPED.labels(stage.name).inc()
                metrics.WORKER_ROUNDS.labels(stage.name).inc()
                metrics.WORKER_ROUND_ACCOUNTS.labels(stage.name).observe(len(keys))
                api_wait.succeeded()
                if len(keys) < stage.max_count:
                    wait_for_next_round(listener, stage, round_started, stopping)
    finally:
        lister.close()
        for conn in connections:
            conn.close()


def wait_for_next_round(
    listener: db.SharedListener, stage: Stage, round_started: float, stopping: threading.Event
) -> None:
    """Until work for the stage is notified or its longest pause is over, and its round gap too."""
    listener.wait(stage.table, round_started + stage.wait_seconds, stopping)
    stopping.wait(max(0.0, round_started + stage.round_gap_seconds - time.monotonic()))


@contextlib.contextmanager
def pool_beside(stage: Stage) -> Iterator[concurrent.futures.ThreadPoolExecutor | None]:
    """The threads that process accounts beside the stage's own, one fewer than its threads; None for one."""
    if stage.threads == 1:
        yield None
        return
    with concurrent.futures.ThreadPoolExecutor(stage.threads - 1, thread_name_prefix=stage.name) as pool:
        yield pool


class RoundPace:
    """How far a round's own thread has got, to size the help it needs (process_round)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        # Accounts the thread has processed, and when it took the ones at hand: one
        # tuple, so that another thread never reads one without the other.
        self.progress = (0, self.started)
        self.at_hand = 0  # read and written by the thread only

    def took(self, count: int) -> None:
        self.progress = (self.progress[0] + self.at_hand, time.monotonic())
        self.at_hand = count

    def check_again_at(self) -> float:
        """When the accounts at hand will have been processed for HOLD_BACK_SECONDS."""
        return self.progress[1] + HOLD_BACK_SECONDS

    def threads_needed(self, now: float, left: int) -> int:
        """How many threads beside this one would end the `left` accounts within HOLD_BACK_SECONDS.

        A thread whose accounts take longer than the hold-back waits (for a
        lock, say) or is starved: then every account left needs a thread.
        Otherwise the thread's pace so far says how long they would take it.
        """
        done, since = self.progress
        if now - since >= HOLD_BACK_SECONDS:
            return left
        if done == 0:  # the first accounts are at hand, and recent: too early to say
            return 0
        seconds_per_account = (since - self.started) / done
        return math.ceil(left * seconds_per_account / HOLD_BACK_SECONDS) - 1


def process_round(
    pool: concurrent.futures.ThreadPoolExecutor | None,
    helpers: int,
    process: Callable[[list[Key]], None],
    keys: list[Key],
    per_call: int,
) -> bool:
    """Process every account: this thread takes them `per_call` at a time, one call after
    another, and threads of the pool help when it cannot end them within HOLD_BACK_SECONDS;
    on an infrastructure error, raise it and start no other. Whether the pool helped.

    While work trickles in, a round has one account or a few, each processed in
    less than the hold-back: processing them here costs less CPU than beside
    each other in pool threads (a backend more at work at once, the threads'
    wake-ups, the GIL changing hands), on a machine of few cores. One pool
    thread watches the round: each time the accounts at hand have been processed
    for the hold-back, it weighs what is left. Accounts that take longer
    wait (a lock, say): up to `helpers` threads take the others. Otherwise as
    many come as would end the rest within the hold-back at this thread's pace
    so far, none when it will end them soon by itself: on a busy machine a
    round of many quick accounts keeps to one thread or a few, and on one with
    cores to spare it takes as many as it needs.
    """
    waiting = collections.deque(keys)
    done = threading.Event()  # nothing is left to take, or an error stops the round
    called_in: list[concurrent.futures.Future] = []
    pace = RoundPace()

    def take_until_done(took: Callable[[int], None] = lambda _count: None) -> None:
        while not done.is_set():
            taken = take(waiting, per_call)
            if not taken:
                return
            took(len(taken))
            process(taken)

    def help_until_done() -> None:
        try:
            take_until_done()
        except BaseException:
            done.set()
            raise

    def watch_the_round() -> bool:
        while not done.wait(max(0.0, pace.check_again_at() - time.monotonic())):
            if not waiting:  # this thread has the last account: nothing is left to help with
                return False
            left = len(waiting)
            threads = min(count, pace.threads_needed(time.monotonic(), left), math.ceil(left / per_call))
            if threads > 0:
                called_in.extend(pool.submit(help_until_done) for _ in range(threads - 1))
                help_until_done()
                return True
        return False

    count = 0 if pool is None else min(helpers, math.ceil(len(keys) / per_call) - 1)
    watcher = pool.submit(watch_the_round) if count else None
    try:
        take_until_done(pace.took)
    finally:
        done.set()
    # Once the watcher returns, every thread it called in is in called_in.
    helped = watcher is not None and watcher.result()
    for future in called_in:
        future.result()
    return helped


def take(waiting: collections.deque[Key], count: int) -> list[Key]:
    """Up to `count` keys from the left of `waiting`, which other threads take from too."""
    taken: list[Key] = []
    while len(taken) < count:
        try:
            taken.append(waiting.popleft())
        except IndexError:
            break
    return taken


def list_keys(lister: psycopg.Connection, stage: Stage, waiting: set[Key]) -> list[Key]:
    """Up to max_count accounts with queued work, none of the `waiting` ones.

    The list functions return accounts in no particular order: asking for as
    many more as there are waiting accounts keeps those from crowding out the others.
    """
    limit = min(stage.max_count + len(waiting), MAX_SQL_INTEGER)
    rows = lister.execute(stage.list_query, {"max_count": limit}).fetchall()
    return [key for key in map(tuple, rows) if key not in waiting][: stage.max_count]
