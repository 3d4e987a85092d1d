"""When a worker stage starts its next round (pyswpt.drivers.workers.wait_for_next_round)."""

from __future__ import annotations

import time

from test_db import CHANNEL, NOTIFIED_WITHIN_SECONDS, shared_listener  # noqa: F401 - the fixture

from pyswpt import config
from pyswpt.drivers import workers

GAP_SECONDS = 0.3


def stage_of_payload_a(round_gap_seconds: float) -> workers.Stage:
    """A stage woken by the shared listener's payload 'a', polling only after NOTIFIED_WITHIN_SECONDS."""
    return workers.Stage("test", "a", "", 1, NOTIFIED_WITHIN_SECONDS, 100, lambda key: None, round_gap_seconds)


def test_a_notified_round_waits_for_the_round_gap(shared_listener):  # noqa: F811 - the fixture
    listener, notifier, stopping = shared_listener
    round_started = time.monotonic()
    listener.forget("a")
    notifier.execute(f"NOTIFY {CHANNEL}, 'a'")

    workers.wait_for_next_round(listener, stage_of_payload_a(GAP_SECONDS), round_started, stopping)

    assert GAP_SECONDS <= time.monotonic() - round_started < NOTIFIED_WITHIN_SECONDS


def test_only_the_balance_changes_stage_has_a_round_gap():
    gaps = {stage.name: stage.round_gap_seconds for stage in workers.stages(config.load({}))}
    assert gaps == {
        "transfer_requests": 0.0,
        "finalization_requests": 0.0,
        "balance_changes": workers.BALANCE_CHANGES_ROUND_GAP_SECONDS,
    }
