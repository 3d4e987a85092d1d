"""Reconnect pauses grow while failures keep coming and start over after a healthy period."""

from __future__ import annotations

from pyswpt.backoff import Backoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pauses_grow_while_failures_come_one_after_another():
    clock = Clock()
    backoff = Backoff((1.0, 2.0, 4.0), healthy_after_seconds=60.0, clock=clock)
    pauses = []
    for _ in range(5):
        pauses.append(backoff.next_pause())
        clock.now += pauses[-1] + 1.0
    assert pauses == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_healthy_period_after_the_pause_starts_the_pauses_over():
    clock = Clock()
    backoff = Backoff((1.0, 2.0, 30.0), healthy_after_seconds=60.0, clock=clock)
    for _ in range(3):
        clock.now += backoff.next_pause()
    # The time spent pausing is not healthy: 59 s of work after the last pause is not enough...
    clock.now += 59.0
    assert backoff.next_pause() == 30.0
    clock.now += 30.0 + 60.0
    # ...60 s is.
    assert backoff.next_pause() == 1.0
