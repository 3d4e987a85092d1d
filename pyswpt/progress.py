"""Progress of the long operator commands (issue 11): how much is done of how much, the rate, the ETA.

On a terminal, a tqdm bar on stderr. Elsewhere (a container log, a pipe, a
file), where a bar's carriage returns would make one endless line, a plain
line every APP_PROGRESS_INTERVAL_SECONDS with the same figures, and one at the
end if any came before: a command that ends sooner prints no progress at all.
Stderr, so that what a command prints on stdout (`audit --json`) stays clean.
Every command that shows progress goes through `track`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from tqdm import tqdm

# The unit is given with its leading space, so that tqdm writes "120/1000 blocks" and "28.5 blocks/s".
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, ETA {remaining}"
BAR_REFRESH_SECONDS = 0.5


class ProgressLines:
    """What tqdm shows, as a line every `interval_seconds`, and one when done if any was printed."""

    def __init__(self, description: str, total: int, unit: str, interval_seconds: float, stream: TextIO):
        self.description = description
        self.total = total
        self.unit = unit
        self.interval_seconds = interval_seconds
        self.stream = stream
        self.done = 0
        self.started = time.monotonic()
        self.printed_at = self.started
        self.printed_done: int | None = None

    def update(self, count: int) -> None:
        self.done += count
        if time.monotonic() - self.printed_at >= self.interval_seconds:
            self.print_line()

    def close(self) -> None:
        if self.printed_done not in (None, self.done):
            self.print_line()

    def print_line(self) -> None:
        now = time.monotonic()
        line = tqdm.format_meter(
            self.done, self.total, now - self.started, prefix=self.description, unit=self.unit, bar_format=LINE_FORMAT
        )
        print(line, file=self.stream, flush=True)
        self.printed_at = now
        self.printed_done = self.done


# What `track` yields: either shows `.update(count)` calls and takes a new `.total`.
Progress = tqdm | ProgressLines


@contextlib.contextmanager
def track(
    description: str, total: int, unit: str, interval_seconds: float, stream: TextIO | None = None
) -> Iterator[Progress]:
    """Progress of `total` `unit`s (e.g. " blocks"); the caller calls `.update(count)` as it goes.

    `total` may be raised while the work goes on by setting `.total`.
    """
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        shown = tqdm(
            total=total, desc=description, unit=unit, file=stream, mininterval=BAR_REFRESH_SECONDS, dynamic_ncols=True
        )
    else:
        shown = ProgressLines(description, total, unit, interval_seconds, stream)
    try:
        yield shown
    finally:
        shown.close()


class Drain:
    """Progress of something that empties, told how much it holds now and then (delete-queue's
    queue): of the most it held, how much has left it."""

    def __init__(self, shown: Progress):
        self.shown = shown
        self.most_count = 0
        self.left_count = 0

    def __call__(self, count: int) -> None:
        self.most_count = max(self.most_count, count)
        self.shown.total = self.most_count
        left_count = self.most_count - count
        self.shown.update(left_count - self.left_count)
        self.left_count = left_count
