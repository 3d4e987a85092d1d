"""Pauses between retries that grow while failures keep coming, and start over after a healthy period."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

RECONNECT_PAUSES_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# Running this long without a failure counts as healthy: the next failure
# waits the first pause again, not the longest one.
HEALTHY_AFTER_SECONDS = 60.0


class Backoff:
    """The pause before the next retry.

    Without the reset, a process that had a few broker or database blips over
    its life would wait the longest pause after every later blip.
    """

    def __init__(
        self,
        pauses_seconds: Sequence[float] = RECONNECT_PAUSES_SECONDS,
        healthy_after_seconds: float = HEALTHY_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        assert pauses_seconds, "at least one pause"
        self.pauses_seconds = tuple(pauses_seconds)
        self.healthy_after_seconds = healthy_after_seconds
        self.clock = clock
        self.failures_in_a_row = 0
        self.last_failure_at: float | None = None

    def next_pause(self) -> float:
        """Count a failure and return how long to wait before trying again."""
        now = self.clock()
        if self.last_failure_at is not None and now - self.last_failure_at >= self.healthy_after_seconds:
            self.failures_in_a_row = 0
        pause = self.pauses_seconds[min(self.failures_in_a_row, len(self.pauses_seconds) - 1)]
        self.failures_in_a_row += 1
        # Measured from the end of the pause: the time spent waiting is not healthy time.
        self.last_failure_at = now + pause
        return pause
