"""A worker stage's rounds: which threads process a round's accounts (process_round), and when
the next round starts (wait_for_next_round)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable

import pytest
from test_db import CHANNEL, NOTIFIED_WITHIN_SECONDS, shared_listener  # noqa: F401 - the fixture

from pyswpt import config
from pyswpt.drivers import workers

GAP_SECONDS = 0.3


def stage_of_payload_a(threads: int = 1, round_gap_seconds: float = 0.0) -> workers.Stage:
    """A stage woken by the shared listener's payload 'a', polling only after NOTIFIED_WITHIN_SECONDS."""
    return workers.Stage(
        "test", "a", "", threads, NOTIFIED_WITHIN_SECONDS, 100, lambda key: None, lambda keys: None, round_gap_seconds
    )


def each(process: Callable[[workers.Key], None]) -> Callable[[list[workers.Key]], None]:
    """A round's processor of several accounts at a time, from one of a single account."""

    def process_each(keys: list[workers.Key]) -> None:
        for key in keys:
            process(key)

    return process_each


def test_a_notified_round_waits_for_the_round_gap(shared_listener):  # noqa: F811 - the fixture
    listener, notifier, stopping = shared_listener
    round_started = time.monotonic()
    listener.forget("a")
    notifier.execute(f"NOTIFY {CHANNEL}, 'a'")

    workers.wait_for_next_round(listener, stage_of_payload_a(round_gap_seconds=GAP_SECONDS), round_started, stopping)

    assert GAP_SECONDS <= time.monotonic() - round_started < NOTIFIED_WITHIN_SECONDS


def test_only_the_balance_changes_stage_has_a_round_gap():
    gaps = {stage.name: stage.round_gap_seconds for stage in workers.stages(config.load({}))}
    assert gaps == {
        "transfer_requests": 0.0,
        "finalization_requests": 0.0,
        "balance_changes": workers.BALANCE_CHANGES_ROUND_GAP_SECONDS,
    }


def threads_of_round(threads: int, keys: list[workers.Key]) -> dict[workers.Key, threading.Thread]:
    """Which thread processed each account of one round of a stage with `threads` threads."""
    processed_in: dict[workers.Key, threading.Thread] = {}

    def process(key: workers.Key) -> None:
        processed_in[key] = threading.current_thread()

    with workers.pool_beside(stage_of_payload_a(threads)) as pool:
        workers.process_round(pool, threads - 1, each(process), keys, 1)
    return processed_in


def test_a_round_of_one_account_is_processed_in_the_stages_own_thread():
    assert threads_of_round(10, [(1, 2)]) == {(1, 2): threading.current_thread()}


def test_a_stage_of_one_thread_processes_every_account_in_its_own_thread():
    keys = [(1, 2), (1, 3), (1, 4)]
    assert threads_of_round(1, keys) == dict.fromkeys(keys, threading.current_thread())


def test_accounts_processed_within_the_hold_back_are_processed_in_the_stages_own_thread():
    keys = [(1, 2), (1, 3), (1, 4)]
    assert threads_of_round(3, keys) == dict.fromkeys(keys, threading.current_thread())


class CountingPool(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that counts the tasks it was given."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers)
        self.tasks = 0

    def submit(self, *args, **kwargs) -> concurrent.futures.Future:
        self.tasks += 1
        return super().submit(*args, **kwargs)


def test_a_round_done_within_the_hold_back_gives_the_pool_one_task(monkeypatch):
    # Far longer than the round takes, however busy the machine.
    monkeypatch.setattr(workers, "HOLD_BACK_SECONDS", NOTIFIED_WITHIN_SECONDS)
    with CountingPool(9) as pool:
        helped = workers.process_round(pool, 9, lambda _keys: None, [(1, creditor_id) for creditor_id in range(20)], 1)
    # One thread watches the hold-back; the others would only be called in once it is over.
    assert pool.tasks == 1
    assert not helped


class Overlaps:
    """A processor that takes `seconds` per account and counts how many accounts it had at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.now = 0
        self.most_at_once = 0

    def __call__(self, _key: workers.Key) -> None:
        with self.lock:
            self.now += 1
            self.most_at_once = max(self.most_at_once, self.now)
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1


# Ten times what an account takes in the tests below, so that a busy machine's slower
# sleeps neither make an account look stuck nor change the threads a round calls for much.
SLOW_HOLD_BACK_SECONDS = 0.1
QUICK_ACCOUNT_SECONDS = 0.01


def test_a_round_its_own_thread_ends_soon_after_the_hold_back_is_not_helped(monkeypatch):
    monkeypatch.setattr(workers, "HOLD_BACK_SECONDS", SLOW_HOLD_BACK_SECONDS)
    # Eleven accounts: at the hold-back one or two are left, 10 or 20 ms for the thread. It
    # would be helped only if the accounts took 1.8 times as long, the round over 200 ms.
    overlaps = Overlaps(QUICK_ACCOUNT_SECONDS)
    with CountingPool(9) as pool:
        helped = workers.process_round(pool, 9, each(overlaps), [(1, creditor_id) for creditor_id in range(11)], 1)
    assert not helped
    assert (pool.tasks, overlaps.most_at_once) == (1, 1)


def test_a_round_of_many_quick_accounts_calls_in_the_threads_that_end_it_within_the_hold_back(monkeypatch):
    monkeypatch.setattr(workers, "HOLD_BACK_SECONDS", SLOW_HOLD_BACK_SECONDS)
    # Forty accounts: at the hold-back about thirty are left, 300 ms for one thread, so
    # three threads; all ten only if the accounts took 2.5 times as long.
    overlaps = Overlaps(QUICK_ACCOUNT_SECONDS)
    with CountingPool(9) as pool:
        helped = workers.process_round(pool, 9, each(overlaps), [(1, creditor_id) for creditor_id in range(40)], 1)
    assert helped
    assert 1 < overlaps.most_at_once < 10


def test_the_threads_a_round_needs_follow_its_own_threads_pace():
    pace = workers.RoundPace()
    pace.started = 0.0
    hold_back = workers.HOLD_BACK_SECONDS
    # Too early to say: the first accounts are at hand and recent.
    pace.progress = (0, 0.0)
    assert pace.threads_needed(hold_back / 2, left=50) == 0
    # Four accounts done in two hold-backs: the nine left would take the thread four and a
    # half, so four more threads end them within one; one left, it ends by itself.
    pace.progress = (4, 2 * hold_back)
    assert pace.threads_needed(2.5 * hold_back, left=9) == 4
    assert pace.threads_needed(2.5 * hold_back, left=1) == 0
    # The account at hand has taken the hold-back: it waits, so every account left needs a thread.
    assert pace.threads_needed(3.5 * hold_back, left=7) == 7


def test_accounts_that_wait_past_the_hold_back_go_to_the_pool_as_many_at_once_as_the_stage_has_threads():
    # Each account waits for the other two: the round ends only if the three run at once.
    all_started = threading.Barrier(3, timeout=NOTIFIED_WITHIN_SECONDS)
    started = time.monotonic()
    with workers.pool_beside(stage_of_payload_a(3)) as pool:
        helped = workers.process_round(pool, 2, each(lambda _key: all_started.wait()), [(1, 2), (1, 3), (1, 4)], 1)
    assert not all_started.broken
    assert helped
    assert time.monotonic() - started >= workers.HOLD_BACK_SECONDS


def test_an_error_in_a_pool_thread_is_raised_by_the_round():
    main = threading.current_thread()
    pool_failed = threading.Event()

    def process(_key: workers.Key) -> None:
        if threading.current_thread() is main:
            pool_failed.wait(NOTIFIED_WITHIN_SECONDS)  # holds the others past the hold-back
            return
        pool_failed.set()
        raise ConnectionError("lost the database")

    with workers.pool_beside(stage_of_payload_a(2)) as pool:
        with pytest.raises(ConnectionError):
            workers.process_round(pool, 1, each(process), [(1, 2), (1, 3), (1, 4)], 1)
    assert pool_failed.is_set()


def test_a_round_uses_no_more_threads_than_the_stage_has():
    processed_in = threads_of_round(3, [(1, creditor_id) for creditor_id in range(20)])
    assert len(processed_in) == 20
    assert len(set(processed_in.values())) <= 3


def test_a_round_takes_its_accounts_as_many_at_a_time_as_a_call_may_have():
    calls: list[list[workers.Key]] = []
    keys = [(1, creditor_id) for creditor_id in range(10)]
    with workers.pool_beside(stage_of_payload_a(3)) as pool:
        workers.process_round(pool, 2, calls.append, keys, 4)
    assert calls == [keys[:4], keys[4:8], keys[8:]]


def test_a_round_of_one_calls_accounts_gives_the_pool_no_task():
    with CountingPool(9) as pool:
        workers.process_round(pool, 9, lambda _keys: None, [(1, creditor_id) for creditor_id in range(4)], 4)
    assert pool.tasks == 0


def test_accounts_at_hand_count_as_done_once_the_thread_takes_the_next_ones():
    pace = workers.RoundPace()
    pace.took(4)
    assert pace.progress[0] == 0
    pace.took(4)
    assert pace.progress[0] == 4


def test_the_accounts_of_a_call_that_failed_go_alone_the_last_first():
    keys = [(1, 2), (1, 3), (1, 4)]
    alone: list[workers.Key] = []
    workers.process_in_turn_or_alone(keys, lambda _keys: False, alone.append)
    # Those after the one that failed were not begun: none of them waits behind it.
    assert alone == [(1, 4), (1, 3), (1, 2)]


def test_the_accounts_of_a_call_that_passed_do_not_go_alone():
    in_turn: list[list[workers.Key]] = []
    alone: list[workers.Key] = []
    workers.process_in_turn_or_alone([(1, 2), (1, 3)], lambda keys: in_turn.append(keys) or True, alone.append)
    workers.process_in_turn_or_alone([(1, 5)], lambda keys: in_turn.append(keys) or True, alone.append)
    assert (in_turn, alone) == ([[(1, 2), (1, 3)]], [(1, 5)])
