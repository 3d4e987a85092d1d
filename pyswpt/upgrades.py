"""Riding out an upgrade of the SQL API: wait while it is missing, give up after a bound.

`configure` of another release may run while the drivers are up. Meanwhile a
function a driver calls may be missing or changed (pyswpt.transactions.is_api_missing);
the driver retries as after any infrastructure error, parks nothing and
rejects nothing. If that lasts longer than APP_API_WAIT_SECONDS, the driver
and the database belong to releases that cannot work together (an old driver
whose entry points the newer release no longer keeps, or a new driver whose
`configure` never ran): the driver exits with EXIT_API_UNAVAILABLE and one
line saying which call failed and what to do, and `pyswpt run all` stops the
node on it (pyswpt.drivers.supervisor) instead of restarting it in a loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pyswpt.transactions import describe_error, is_api_missing

# The exit status of a driver, and of `pyswpt run all`, that gave up waiting
# for its SQL API: not 1, so that a supervisor tells it from a crash.
EXIT_API_UNAVAILABLE = 4


class ApiUnavailable(Exception):
    """The SQL API a driver needs stayed missing too long; str() is the one line to log."""


class ApiWait:
    """Since when the SQL API of one driver loop has been missing, and the bound on it.

    The loop reports each error it is about to retry (`failed`) and each step
    that worked (`succeeded`). Other errors (a lost connection) neither start
    nor end the wait: they say nothing about the API.
    """

    def __init__(self, wait_seconds: float, what: str, clock: Callable[[], float] = time.monotonic):
        self.wait_seconds = wait_seconds
        self.what = what  # the driver loop, e.g. "the consumer of swpt_accounts"
        self.clock = clock
        self.missing_since: float | None = None

    def failed(self, error: BaseException) -> None:
        """Count an error that is about to be retried; raise ApiUnavailable once the bound is over."""
        if not is_api_missing(error):
            return
        now = self.clock()
        if self.missing_since is None:
            self.missing_since = now
        if now - self.missing_since >= self.wait_seconds:
            raise ApiUnavailable(
                f"Stopping {self.what}: the SQL API it needs has been unusable for "
                f"{now - self.missing_since:.0f} s ({describe_error(error)}); run `pyswpt configure` of the "
                "release this driver belongs to, or upgrade the driver to the release that configured the database."
            )

    def succeeded(self) -> None:
        self.missing_since = None
