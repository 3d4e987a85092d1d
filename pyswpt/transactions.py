"""Running SQL function calls in transactions: retries, and whose fault an error is."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.pq import TransactionStatus

from pyswpt import metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ATTEMPTS = 8
FIRST_RETRY_PAUSE_SECONDS = 0.1
MAX_RETRY_PAUSE_SECONDS = 10.0
RETRIED_ERRORS = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
# Errors that the data of one call causes: the call is refused, the rest can go on.
REFUSING_ERRORS = (
    psycopg.errors.DataError,
    psycopg.errors.IntegrityError,
    psycopg.errors.RaiseException,
    psycopg.errors.AssertFailure,
)
# SQLSTATEs that say the SQL API a driver calls is not (or not yet) the one it
# was written for: a function, table, column or schema that is missing, or not
# granted, while `configure` of another release runs or after it. A changed
# signature shows as a missing function too (argument names are part of it).
API_MISSING_SQLSTATES = (
    "42883",  # undefined_function
    "42P01",  # undefined_table
    "42703",  # undefined_column: a function's result columns changed
    "3F000",  # invalid_schema_name
    "42501",  # insufficient_privilege
    "42P13",  # invalid_function_definition: a function returning a table's rows, after a
    # migration changed the table and before `configure` re-created the function
    "42804",  # datatype_mismatch: the same for a PL/pgSQL one, whose RETURN QUERY then
    # no longer matches its result type (our statements are fixed: only a changed API does this)
)
# A statement that psycopg prepared on this connection (after a few runs) and
# whose function now returns another type fails with this error until the
# connection is replaced; the server function that raises it names the case,
# whatever the language of the message.
CHANGED_RESULT_SQLSTATE = "0A000"
CHANGED_RESULT_SOURCE_FUNCTION = "RevalidateCachedQuery"
# A session that runs a plan naming a function which `configure` dropped and
# created again, before the session took in the change, fails with PostgreSQL's
# internal error for a missing catalog entry (an elog message: never translated).
STALE_FUNCTION_SQLSTATE = "XX000"
STALE_FUNCTION_MESSAGE = "cache lookup failed for function "
# SQLSTATEs (or their class prefixes) that say the server or the connection
# is unwell: never the fault of the message or row at hand. Connection
# exceptions, failed authentication, configuration file errors, lack of
# resources, shutdowns, system errors, a database that does not exist, a
# read-only server; a statement that psycopg believes prepared on the
# connection and the server does not have (26000: pyswpt prepares nothing by
# name, so only the connection's state can be at fault, and a new one has
# none; see forget_prepared_statements). A missing SQL API is the
# infrastructure's too (is_api_missing).
INFRASTRUCTURE_SQLSTATE_PREFIXES = (
    "08",
    "28",
    "F0",
    "53",
    "57P",
    "58",
    "3D000",
    "25006",
    "26000",
)


@dataclasses.dataclass(frozen=True)
class SqlCall:
    """One SQL function call; `query` is constant text, values go in `params`."""

    query: str
    params: tuple[Any, ...] | Mapping[str, Any]


def with_retries(conn: psycopg.Connection, action: Callable[[psycopg.Connection], T]) -> T:
    """Run `action` in a transaction, again after a serialization failure or deadlock."""

    def in_transaction() -> T:
        with conn.transaction():
            return action(conn)

    return retrying(in_transaction)


@contextlib.contextmanager
def transaction_begun_in_block(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction whose BEGIN the block sends together with its first statements, in one query.

    psycopg's own transaction() waits for the result of BEGIN before anything
    else: a round trip of its own. On a connection in autocommit BEGIN can go
    out with the statements that follow it. COMMIT after the block; a failure
    rolls the transaction back.
    """
    if not conn.autocommit:
        raise ValueError("a transaction begun in its block needs a connection in autocommit")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            conn.execute("ROLLBACK")
        raise


def at_read_committed(conn: psycopg.Connection) -> None:
    """Make the transaction just begun READ COMMITTED; it must not have run a statement yet.

    For a transaction that reads nothing but the rows it locks and locks many
    that the workers keep changing (announcing accounts' state). At REPEATABLE
    READ, locking a row changed after the transaction's snapshot fails the whole
    transaction (40001), and under steady load so does every retry. At READ
    COMMITTED a lock returns the row's latest version, checked again against
    the query's conditions, so what is announced is what the row holds.
    """
    conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")


def execute_with_retries(conn: psycopg.Connection, call: SqlCall) -> psycopg.Cursor:
    """Run one statement as a transaction of its own, again after a serialization failure or deadlock.

    The connection must be in autocommit: the statement is then one round
    trip, with neither BEGIN nor COMMIT, and as atomic as in an explicit
    transaction, at the session's isolation level.
    """
    if not conn.autocommit:
        raise ValueError("execute_with_retries needs a connection in autocommit")
    return retrying(lambda: conn.execute(call.query, call.params))


def retrying(attempt: Callable[[], T]) -> T:
    """`attempt()`, again (with growing pauses) while it fails with a serialization failure or deadlock."""
    for attempt_number in range(RETRY_ATTEMPTS + 1):
        try:
            return attempt()
        except RETRIED_ERRORS as error:
            if attempt_number == RETRY_ATTEMPTS:
                raise
            metrics.TRANSACTION_RETRIES.labels(error.sqlstate).inc()
            pause = 0.0 if attempt_number == 0 else FIRST_RETRY_PAUSE_SECONDS * 2 ** (attempt_number - 1)
            logger.info("Retrying a transaction after %s.", type(error).__name__)
            time.sleep(min(pause, MAX_RETRY_PAUSE_SECONDS) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def execute_calls(conn: psycopg.Connection, calls: Sequence[SqlCall]) -> list[tuple | None]:
    """Every call in one transaction, again after a serialization failure or deadlock; the first row of each result.

    The whole transaction is one round trip: on a connection in autocommit
    (for the duration), a statement alone is an implicit transaction, and so
    are statements sent in pipeline mode up to a Sync, committed at the Sync; a
    call that fails rolls it back. With psycopg's transaction() in pipeline
    mode, BEGIN and COMMIT would each wait for a round trip of their own.
    """

    def in_one_round_trip() -> list[tuple | None]:
        with in_autocommit(conn):
            if len(calls) == 1:
                # Alone, a statement is such a transaction without pipeline mode, which would
                # add a Flush message and about 50 µs of client CPU (measured) to a window of one.
                return [conn.execute(calls[0].query, calls[0].params).fetchone()]
            try:
                with conn.pipeline():
                    cursors = [conn.execute(call.query, call.params) for call in calls]
            except psycopg.Error:
                forget_prepared_statements(conn)
                raise
        return [cursor.fetchone() for cursor in cursors]

    return retrying(in_one_round_trip)


def forget_prepared_statements(conn: psycopg.Connection) -> None:
    """After a pipeline that failed, make psycopg forget the statements it prepared on the connection.

    psycopg (3.3) prepares a query on its prepare_threshold-th run. When that
    run follows a failed statement in the same pipeline, the server skips its
    Parse, but psycopg records the statement as prepared, and every later run
    of the query on the connection fails with 26000 (no such prepared
    statement): the good messages of a window with a bad one would have failed
    alone too, and been parked. psycopg empties its cache, and deallocates the
    server's statements, whenever one of its transaction blocks rolls back: an
    empty block rolled back on purpose does only that. (A DEALLOCATE ALL of our
    own would not do: psycopg looks at its outcome only the first time it sees
    the text.) The caller raises the pipeline's error in any case; a connection
    that could not be reset fails its next statement with 26000, an
    infrastructure error, and is replaced.
    """
    if conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
        return
    try:
        with conn.transaction(force_rollback=True):
            pass
    except psycopg.Error as error:
        logger.warning("Could not reset the prepared statements of a connection (%s).", describe_error(error))


@contextlib.contextmanager
def in_autocommit(conn: psycopg.Connection) -> Iterator[None]:
    """The connection in autocommit for the block (a setting of the client: it costs no round trip)."""
    was = conn.autocommit
    conn.autocommit = True
    try:
        yield
    finally:
        conn.autocommit = was


def is_infrastructure_error(error: BaseException) -> bool:
    """True when `error` is not the fault of the data at hand: retry later, never park.

    psycopg raises OperationalError without a SQLSTATE for a connection that
    broke, and InterfaceError for one that is closed. QueryCanceled (57014,
    a statement timeout) is an OperationalError too, but it is not an
    infrastructure error: a statement that runs too long for one message while
    its neighbours pass is that message's problem.
    """
    if isinstance(error, psycopg.InterfaceError):
        return True
    if not isinstance(error, psycopg.Error):
        return False
    sqlstate = error.sqlstate
    if sqlstate is None:
        return isinstance(error, psycopg.OperationalError)
    return sqlstate.startswith(INFRASTRUCTURE_SQLSTATE_PREFIXES) or is_api_missing(error)


def is_api_missing(error: BaseException) -> bool:
    """True when the SQL API the caller needs is missing or changed (see API_MISSING_SQLSTATES):
    an upgrade is under way, or the driver belongs to another release than the database."""
    if not isinstance(error, psycopg.Error) or error.sqlstate is None:
        return False
    if error.sqlstate == CHANGED_RESULT_SQLSTATE:
        return error.diag.source_function == CHANGED_RESULT_SOURCE_FUNCTION
    if error.sqlstate == STALE_FUNCTION_SQLSTATE:
        return (error.diag.message_primary or "").startswith(STALE_FUNCTION_MESSAGE)
    return error.sqlstate in API_MISSING_SQLSTATES


def describe_error(error: BaseException) -> str:
    """One line: for a database error its SQLSTATE and primary message, never DETAIL (it can hold row contents)."""
    if not isinstance(error, psycopg.Error):
        return " ".join(str(error).split()) or type(error).__name__
    primary = error.diag.message_primary or " ".join(str(error).split()) or type(error).__name__
    return f"SQLSTATE {error.sqlstate or 'none'}: {primary}".replace("\n", " ")
