"""The table-scanner engine (spec 02 §4.3, spec 01 §8.3).

A scanner walks one table's heap for ever, a few blocks per query, and hands
the keys it read to its steps in "beats", paced so that one pass over the
table takes about the configured duration. Every query and every step is its
own short transaction; the steps re-check each key under a row lock, so keys
read a while ago (or twice) are harmless.

Reader: starts at a random heap block, reads `blocks_per_query` blocks per
query; an empty range looks up the table's size and, unless the end was
reached, doubles its stride (fast-forward over emptied space) up to
MAX_FAST_FORWARD_FACTOR. At the end it wraps to block 0. A beat never takes
the same row twice: filling stops at the wrap.

Rhythm: rows per beat and the beat length come from the planner's row
estimate; the rhythm is recomputed when the pass time is over or when the
estimate moved out of (0.8, 1.25) of its value (checked about every 15 minutes).

Pass records: each pass (one rhythm) is written to the table scan_pass when it
starts and ends, and its rows done about every RECORD_INTERVAL_SECONDS in
between, beats and pauses alike, so that `pyswpt status` can tell a scanner
that runs from one that stopped.

Isolation: when the database refuses a step for a beat's keys (anything but
an infrastructure error), the step is run again on halves of them until the
failing keys are found; each is logged in one line and skipped by that step
for this pass, and the other keys and steps go on. An infrastructure error
(or a failing read) makes the scanner reconnect with backoff and take the
beat's keys again: the scanner never dies of a row. A SQL API that stays
missing past APP_API_WAIT_SECONDS (pyswpt.upgrades) ends the process.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Protocol

import psycopg

from pyswpt import amqp, db, metrics, processes, queries
from pyswpt.backoff import Backoff
from pyswpt.config import Config
from pyswpt.transactions import describe_error, is_infrastructure_error, with_retries
from pyswpt.upgrades import ApiUnavailable, ApiWait

logger = logging.getLogger(__name__)

MIN_ROWS_PER_BEAT = 10
MAX_ROWS_PER_BEAT = 5000
MIN_BEATS_PER_RHYTHM = 5
SIZE_CHECK_INTERVAL_SECONDS = 15 * 60
SIZE_CHANGE_RATIO_MIN = 0.8
SIZE_CHANGE_RATIO_MAX = 1.25
MIN_SLEEP_SECONDS = 0.010
# Waiting in slices this long keeps SIGTERM and broker heartbeats answered.
WAIT_SLICE_SECONDS = 0.5
# Cached plans are dropped this often, so that plans made when the table was
# tiny (or huge) do not outlive the statistics they were made for.
DISCARD_PLANS_INTERVAL_SECONDS = 10.0
# The stride over empty block ranges doubles up to this many times
# blocks_per_query: it bounds how many rows one query can return.
MAX_FAST_FORWARD_FACTOR = 8
# PostgreSQL's MaxHeapTuplesPerPage for 8 kB blocks.
MAX_ROWS_PER_BLOCK = 291
# How often a scanner writes how far its pass went: often enough for `pyswpt
# status` to see within minutes that it stopped (a pause between beats may last
# an hour and a half), rare enough to cost nothing.
RECORD_INTERVAL_SECONDS = 60.0

Key = tuple
# One step of a scanner: does its work on the keys in one transaction of its own.
Step = Callable[[psycopg.Connection, list[Key], dt.datetime], object]


class TableScanner(Protocol):
    """What a scanner tells the engine: its table, how to read keys, what to do with them."""

    table_name: str  # accepted by pyswpt_api.get_scanned_table_size
    read_keys_query: str  # SELECT the keys of the blocks [%(first_block)s, %(first_block)s + %(block_count)s)

    def steps(self) -> list[Step]:
        """The steps to run on each beat's keys, in order."""

    def keep_alive(self) -> None:
        """Called at least every WAIT_SLICE_SECONDS while idle (broker heartbeats)."""

    def close(self) -> None:
        """Release the scanner's own connections (broker, fetch API)."""


@dataclasses.dataclass(frozen=True)
class Pace:
    pass_seconds: float  # one pass over the table (APP_*_SCAN_HOURS/DAYS)
    beat_milliseconds: int  # APP_*_SCAN_BEAT_MILLISECS
    blocks_per_query: int  # APP_*_SCAN_BLOCKS_PER_QUERY


@dataclasses.dataclass(frozen=True)
class Rhythm:
    total_rows: int
    rows_per_beat: int
    beats: int
    beat_seconds: float


def calc_rhythm(row_estimate: float, pass_seconds: float, beat_milliseconds: int) -> Rhythm:
    """Rows per beat and beat length for one pass (spec 02 §4.3 "Rhythm")."""
    total_rows = max(0, int(row_estimate))
    target_beats = max(1, int(pass_seconds * 1000 // beat_milliseconds))
    rows_per_beat = min(max(MIN_ROWS_PER_BEAT, math.ceil(total_rows / target_beats)), MAX_ROWS_PER_BEAT)
    beats = max(MIN_BEATS_PER_RHYTHM, math.ceil(total_rows / rows_per_beat))
    return Rhythm(total_rows, rows_per_beat, beats, pass_seconds / beats)


def has_size_changed(rhythm: Rhythm, row_estimate: float, beats_between_checks: int) -> bool:
    """Whether the table grew or shrank enough to need a new rhythm (spec 02 §4.3)."""
    n = beats_between_checks * rhythm.rows_per_beat
    ratio = (max(0.0, row_estimate) + n) / (rhythm.total_rows + n)
    return not SIZE_CHANGE_RATIO_MIN < ratio < SIZE_CHANGE_RATIO_MAX


def table_size(conn: psycopg.Connection, table_name: str) -> tuple[int, float]:
    """(heap blocks, planner row estimate) of a scanned table."""
    params = {"table_name": table_name}
    return with_retries(conn, lambda c: c.execute(queries.GET_SCANNED_TABLE_SIZE, params).fetchone())


class BlockReader:
    """Reads a table's keys block range by block range, wrapping at the end, for ever."""

    def __init__(self, scanner: TableScanner, blocks_per_query: int, start_block: int):
        self.scanner = scanner
        self.blocks_per_query = blocks_per_query
        self.max_blocks_per_query = blocks_per_query * MAX_FAST_FORWARD_FACTOR
        self.block = start_block
        self.stride = blocks_per_query
        self.queue: collections.deque[Key] = collections.deque()
        # The table's size when last looked up, and when the current pass began
        # (None until the first wrap: a scan starts at a random block).
        self.block_count = 0
        self.pass_started_at: float | None = None

    def max_queued_rows(self) -> int:
        # A beat put back, or the rest of a read that filled a beat, plus one more read.
        return MAX_ROWS_PER_BEAT + self.max_blocks_per_query * MAX_ROWS_PER_BLOCK

    def take(self, conn: psycopg.Connection, count: int) -> list[Key]:
        """Up to `count` keys: queued ones first, then new reads until the end of the table."""
        assert count <= MAX_ROWS_PER_BEAT
        self.fill(conn, count)
        assert len(self.queue) <= self.max_queued_rows(), "the reader queue outgrew its bound"
        return [self.queue.popleft() for _ in range(min(count, len(self.queue)))]

    def put_back(self, keys: list[Key]) -> None:
        """Keys taken by a beat that could not be processed: the next beat takes them first."""
        self.queue.extendleft(reversed(keys))

    def fill(self, conn: psycopg.Connection, count: int) -> None:
        while len(self.queue) < count:
            keys = self.read(conn, self.block, self.stride)
            if keys:
                self.queue.extend(keys)
                self.block += self.stride
                self.stride = self.blocks_per_query
                continue
            self.block_count, _ = table_size(conn, self.scanner.table_name)
            if self.block + self.stride >= self.block_count:
                # The end: start over from block 0 in the next beat, so that no
                # beat takes a row twice.
                self.block = 0
                self.stride = self.blocks_per_query
                self.count_pass()
                return
            self.block += self.stride
            self.stride = min(self.stride * 2, self.max_blocks_per_query)

    def count_pass(self) -> None:
        """A pass ended at the end of the table: its metrics, if it was a whole one."""
        now = time.monotonic()
        if self.pass_started_at is not None:
            metrics.SCANNER_PASSES.labels(self.scanner.table_name).inc()
            metrics.SCANNER_LAST_PASS_SECONDS.labels(self.scanner.table_name).set(now - self.pass_started_at)
        self.pass_started_at = now

    def progress(self) -> float:
        """How far the pass is: blocks read over blocks in the table (as last looked up)."""
        return min(1.0, self.block / self.block_count) if self.block_count else 0.0

    def read(self, conn: psycopg.Connection, first_block: int, block_count: int) -> list[Key]:
        query = self.scanner.read_keys_query
        params = {"first_block": first_block, "block_count": block_count}
        return with_retries(conn, lambda c: [tuple(row) for row in c.execute(query, params)])


class PassRecorder:
    """Writes one pass's progress to scan_pass: at its start, about every RECORD_INTERVAL_SECONDS, at its end."""

    def __init__(self, conn: psycopg.Connection, table_name: str):
        self.conn = conn
        self.table_name = table_name
        self.rows_done = 0
        self.recorded_at = time.monotonic()

    def start(self, pass_seconds: float, row_estimate: float) -> None:
        params = {"table_name": self.table_name, "pass_seconds": pass_seconds, "row_estimate": int(row_estimate)}
        self.write(queries.RECORD_SCAN_PASS_START, params)

    def add_rows(self, count: int) -> None:
        self.rows_done += count
        self.record_if_due()

    def record_if_due(self) -> None:
        if time.monotonic() >= self.due_at():
            self.write(queries.RECORD_SCAN_PROGRESS, {"table_name": self.table_name, "rows_done": self.rows_done})

    def due_at(self) -> float:
        return self.recorded_at + RECORD_INTERVAL_SECONDS

    def end(self) -> None:
        self.write(queries.RECORD_SCAN_PASS_END, {"table_name": self.table_name, "rows_done": self.rows_done})

    def write(self, query: str, params: dict) -> None:
        with_retries(self.conn, lambda c: c.execute(query, params))
        self.recorded_at = time.monotonic()


def run_scanners(config: Config, scanners: list[tuple[TableScanner, Pace]]) -> int:
    """The body of `pyswpt run scan-*` and `run scanners`: scan_in_threads until
    SIGTERM, SIGINT or SIGHUP.

    A scanner whose loop ends with an error stops the others, and the process
    exits with status 1 for its supervisor to start it again; ApiUnavailable
    (its SQL API stayed missing) propagates, so the process exits with its status.
    """
    try:
        scan_in_threads(config, scanners, processes.stop_event_on_signals())
    except ApiUnavailable:
        raise
    except Exception:  # noqa: BLE001 - logged by the scanner's thread
        return 1
    return 0


def scan_in_threads(config: Config, scanners: list[tuple[TableScanner, Pace]], stopping: threading.Event) -> None:
    """Each scanner in a thread of its own until `stopping` is set, or until one of them
    fails: that one's error (logged here) is raised once every scanner has stopped,
    ApiUnavailable before any other."""
    failures: list[BaseException] = []

    def scan(scanner: TableScanner, pace: Pace) -> None:
        logger.info(
            "Starting the %s scanner: one pass every %.0f s, beats of %d ms, %d blocks per query.",
            scanner.table_name,
            pace.pass_seconds,
            pace.beat_milliseconds,
            pace.blocks_per_query,
        )
        api_wait = ApiWait(config.api_wait_seconds, f"the {scanner.table_name} scanner")
        try:
            scan_until_stopped(scanner, pace, config.driver_postgres_url, stopping, api_wait)
        except BaseException as error:  # noqa: BLE001 - raised again by the calling thread
            if not isinstance(error, ApiUnavailable):
                logger.exception("The %s scanner failed.", scanner.table_name)
            failures.append(error)
            stopping.set()
        finally:
            scanner.close()
        logger.info("Stopped scanning %s.", scanner.table_name)

    threads = [
        threading.Thread(target=scan, args=(scanner, pace), name=f"scan {scanner.table_name}")
        for scanner, pace in scanners
    ]
    for thread in threads:
        thread.start()
    processes.join_threads(threads)
    failures.sort(key=lambda failure: not isinstance(failure, ApiUnavailable))
    if failures:
        raise failures[0]


def scan_until_stopped(
    scanner: TableScanner,
    pace: Pace,
    postgres_url: str,
    stopping: threading.Event,
    api_wait: ApiWait,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> None:
    """Pass over the table again and again until `stopping` is set (checked every beat).

    A database error that escapes a beat (rows' failures do not) closes the
    connection; the scan goes on where it was on a new one, after a backoff.
    So does a broker error: the beat's transaction rolls back, and the
    scanner's publisher reconnects when it next publishes. Raises
    ApiUnavailable when the scanner's SQL API stays missing too long.
    """
    reader: BlockReader | None = None
    backoff = Backoff()
    while not stopping.is_set():
        try:
            with db.connect(postgres_url, application_name=f"pyswpt scan {scanner.table_name}") as conn:
                if reader is None:
                    reader = start_reader(conn, scanner, pace)
                while not stopping.is_set():
                    run_rhythm(conn, scanner, reader, pace, api_wait, stopping, clock)
        except (psycopg.Error, *amqp.CONNECTION_ERRORS) as error:
            api_wait.failed(error)
            pause = backoff.next_pause()
            logger.error(
                "Scanning %s failed (%s); reconnecting in %.0f s.", scanner.table_name, describe_error(error), pause
            )
            wait_until(time.monotonic() + pause, scanner, stopping)


def start_reader(conn: psycopg.Connection, scanner: TableScanner, pace: Pace) -> BlockReader:
    """A reader from a random block, so that restarts do not favour the table's start."""
    block_count, _ = table_size(conn, scanner.table_name)
    reader = BlockReader(scanner, pace.blocks_per_query, random.randrange(max(1, block_count)))
    reader.block_count = block_count
    logger.info("Scanning %s from block %d.", scanner.table_name, reader.block)
    return reader


def run_rhythm(
    conn: psycopg.Connection,
    scanner: TableScanner,
    reader: BlockReader,
    pace: Pace,
    api_wait: ApiWait,
    stopping: threading.Event,
    clock: Callable[[], dt.datetime],
) -> None:
    """Beats at a steady pace until the pass time is over or the table size changed: one pass."""
    _, row_estimate = table_size(conn, scanner.table_name)
    recorder = PassRecorder(conn, scanner.table_name)
    recorder.start(pace.pass_seconds, row_estimate)
    rhythm = calc_rhythm(row_estimate, pace.pass_seconds, pace.beat_milliseconds)
    beats_between_checks = max(1, math.ceil(SIZE_CHECK_INTERVAL_SECONDS / rhythm.beat_seconds))
    logger.info(
        "New rhythm for %s: %d rows per beat, %d beats of %.3f s.",
        scanner.table_name,
        rhythm.rows_per_beat,
        rhythm.beats,
        rhythm.beat_seconds,
    )
    started = time.monotonic()
    plans_discarded = started
    beat_number = 0
    while not stopping.is_set():
        beat_number += 1
        keys = reader.take(conn, rhythm.rows_per_beat)
        if keys:
            try:
                process_beat(conn, scanner, keys, clock())
            except (psycopg.Error, *amqp.CONNECTION_ERRORS):
                # Not the rows' fault (process_beat isolates those): they are taken again.
                reader.put_back(keys)
                raise
        metrics.SCANNER_ROWS.labels(scanner.table_name).inc(len(keys))
        metrics.SCANNER_PASS_PROGRESS.labels(scanner.table_name).set(reader.progress())
        api_wait.succeeded()
        if time.monotonic() - plans_discarded >= DISCARD_PLANS_INTERVAL_SECONDS:
            with conn.transaction():
                conn.execute("DISCARD PLANS")
            plans_discarded = time.monotonic()
        recorder.add_rows(len(keys))
        if time.monotonic() - started >= pace.pass_seconds:
            recorder.end()
            return
        if beat_number % beats_between_checks == 0:
            _, row_estimate = table_size(conn, scanner.table_name)
            if has_size_changed(rhythm, row_estimate, beats_between_checks):
                recorder.end()
                return
        # An absolute schedule: a slow beat is made up by shorter sleeps after it.
        wait_recording(started + beat_number * rhythm.beat_seconds, scanner, stopping, recorder)


def process_beat(conn: psycopg.Connection, scanner: TableScanner, keys: list[Key], now: dt.datetime) -> None:
    """Every step of the scanner on one beat's keys; a key that a step fails on is skipped by that step."""
    for step in scanner.steps():
        run_step_isolated(conn, scanner.table_name, step, keys, now)


def run_step_isolated(conn: psycopg.Connection, table_name: str, step: Step, keys: list[Key], now: dt.datetime) -> None:
    """Run `step` on `keys`; when the database refuses it (not an infrastructure error),
    on each half in turn, down to the single keys to blame, which are logged and skipped.

    Bounded: at most 2 * len(keys) - 1 calls. A refused call rolled its
    transaction back, so running the step again on a part of its keys does
    nothing twice.
    """
    groups = [keys]
    while groups:
        group = groups.pop()
        try:
            step(conn, group, now)
        except psycopg.Error as error:
            if is_infrastructure_error(error):
                raise
            if len(group) == 1:
                metrics.SCANNER_SKIPPED_ROWS.labels(table_name).inc()
                logger.warning(
                    "Skipped %s key %s in step %s for this pass (%s).",
                    table_name,
                    group[0],
                    step.__name__,
                    describe_error(error),
                    extra={"table": table_name, "sqlstate": error.sqlstate},
                )
                continue
            middle = len(group) // 2
            groups += [group[middle:], group[:middle]]


def wait_recording(deadline: float, scanner: TableScanner, stopping: threading.Event, recorder: PassRecorder) -> None:
    """wait_until, writing the pass's progress when it is due: the scanner is seen to run while it waits."""
    while not stopping.is_set() and deadline - time.monotonic() >= MIN_SLEEP_SECONDS:
        wait_until(min(deadline, recorder.due_at()), scanner, stopping)
        recorder.record_if_due()


def wait_until(deadline: float, scanner: TableScanner, stopping: threading.Event) -> None:
    """Sleep until the monotonic `deadline`, or until stopped; tiny sleeps are skipped."""
    while not stopping.is_set():
        remaining = deadline - time.monotonic()
        if remaining < MIN_SLEEP_SECONDS:
            return
        stopping.wait(min(remaining, WAIT_SLICE_SECONDS))
        scanner.keep_alive()
