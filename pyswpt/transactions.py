"""Running SQL function calls in transactions: retries, and finding a refused message."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ATTEMPTS = 8
FIRST_RETRY_PAUSE_SECONDS = 0.1
MAX_RETRY_PAUSE_SECONDS = 10.0
RETRIED_ERRORS = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
# Errors that the data of one call causes: the call is refused, the rest can go on.
# Anything else (a bug, a lost server) is not a message's fault and must not be acked.
REFUSING_ERRORS = (
    psycopg.errors.DataError,
    psycopg.errors.IntegrityError,
    psycopg.errors.RaiseException,
    psycopg.errors.AssertFailure,
)


@dataclasses.dataclass(frozen=True)
class SqlCall:
    """One SQL function call; `query` is constant text, values go in `params`."""

    query: str
    params: tuple[Any, ...] | Mapping[str, Any]


def with_retries(conn: psycopg.Connection, action: Callable[[psycopg.Connection], T]) -> T:
    """Run `action` in a transaction, again after a serialization failure or deadlock."""
    for attempt in range(RETRY_ATTEMPTS + 1):
        try:
            with conn.transaction():
                return action(conn)
        except RETRIED_ERRORS as error:
            if attempt == RETRY_ATTEMPTS:
                raise
            pause = 0.0 if attempt == 0 else FIRST_RETRY_PAUSE_SECONDS * 2 ** (attempt - 1)
            logger.info("Retrying a transaction after %s.", type(error).__name__)
            time.sleep(min(pause, MAX_RETRY_PAUSE_SECONDS) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def execute_calls(conn: psycopg.Connection, calls: Sequence[SqlCall]) -> list[tuple | None]:
    """Every call in one round trip (pipeline mode); the first row of each result."""
    with conn.pipeline():
        cursors = [conn.execute(call.query, call.params) for call in calls]
    return [cursor.fetchone() for cursor in cursors]


def execute_as_batch(
    conn: psycopg.Connection, calls: Sequence[SqlCall]
) -> list[tuple | None | psycopg.Error]:
    """All calls in one transaction; if the database refuses the batch, one by one.

    The result of each call is its first row, or the error with which the
    database refused that call alone (the caller rejects its message).
    """
    if not calls:
        return []
    try:
        return with_retries(conn, lambda c: execute_calls(c, calls))
    except REFUSING_ERRORS as error:
        logger.warning("The database refused a batch (%s); applying it one message at a time.", error)
    results: list[tuple | None | psycopg.Error] = []
    for call in calls:
        try:
            results.append(with_retries(conn, lambda c: execute_calls(c, [call])[0]))
        except REFUSING_ERRORS as error:
            results.append(error)
    return results
