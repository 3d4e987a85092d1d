"""PostgreSQL connections for the drivers, the tests and the benchmarks: the one factory.

Every connection made here carries the same session settings, given as
connection options so that they hold from the first statement on, whatever
the server's defaults are:

* REPEATABLE READ isolation (spec 02 §2.0). The drivers' transactions each
  wait for at most one account row (a finalization may lock its recipient as
  well, without waiting), and the SQL functions read before they lock (a
  processor takes its queued requests, then locks the account). At this
  level a transaction whose snapshot is older than the account row it locks
  fails with a serialization failure (40001) instead of carrying on with
  reads and a `now()` that predate the row, and every driver runs its
  transactions through `pyswpt.transactions.with_retries`, which re-runs
  them. So the transactions that change one account commit in the order of
  their `now()`, and an account's transfers are never dated before the ones
  numbered before them. The queue takes (`FOR UPDATE SKIP LOCKED`) may fail
  the same way when two takers race for one row, and are retried alike. At
  READ COMMITTED the same schedules pass silently with stale reads. (The
  transactions that announce many accounts' state read only rows they lock,
  and run at READ COMMITTED: pyswpt.transactions.at_read_committed.)
* A statement timeout and a lock timeout, so that a stuck statement or a
  forgotten lock holder makes a driver fail loudly instead of hanging.
* The UTC time zone: SMP carries date-times up to 9999-12-31T23:59:59Z (T∞),
  which in a zone east of UTC reads as year 10000, which no Python datetime
  can hold, so every row holding T∞ would fail to load.

Connections start with autocommit off: a driver step is one explicit
transaction (pyswpt.transactions.with_retries), committed or rolled back as a
whole. A step that is one statement (a worker's batch processor) may instead
run on a connection in autocommit, where that statement is a transaction of
its own at the same isolation level (transactions.execute_with_retries). Two
hot steps run in autocommit so that BEGIN costs no round trip of its own: a
consumer's window is one implicit transaction, a call alone or several sent
in pipeline mode, which the protocol's Sync commits
(transactions.execute_calls), and a flusher's round sends BEGIN in the query
that takes its rows (transactions.transaction_begun_in_block). A
LISTEN connection is in autocommit and gets the same settings; its listing
queries are single statements. The fetch API's connections are
read-only (enforced by PostgreSQL) with a shorter statement timeout.

The workers and the flushers commit asynchronously (synchronous_commit off):
a commit returns before its WAL is on the disk, so it costs no flush of its
own. A PostgreSQL crash may then undo their last commits, which is safe
because nothing they changed has left the database yet: a worker's effects
leave only through the outbox, and the flusher makes every commit it saw
durable before it publishes (pyswpt_api.make_commits_durable, which waits
only when the WAL is not yet flushed past them); undone work
is done again from the queued requests, which the consumers' synchronous
commits made durable before they acked the messages. An undone flusher
commit only publishes its rows again (at least once).
Options an operator put in the URL come after these, so they win.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from pyswpt.backoff import Backoff

logger = logging.getLogger(__name__)

# Giving up on a TCP connect or the start-up handshake.
CONNECT_TIMEOUT_SECONDS = 10
# Waiting for a free pooled connection before PoolTimeout is raised.
POOL_TIMEOUT_SECONDS = 10.0
# Pooled connections are replaced after this age, so server-side memory and
# planner caches do not grow forever.
POOL_MAX_LIFETIME_SECONDS = 3600.0
# Idle connections above min_size are closed after this long.
POOL_MAX_IDLE_SECONDS = 600.0
# application_name is limited to 63 bytes by PostgreSQL.
APPLICATION_NAME_MAX_BYTES = 63

# Spec 02 §2.0; see the module's comment.
ISOLATION_LEVEL = "repeatable read"
# The longest legitimate statements are bounded batches: a worker's 10,000
# requests of one account, a consumer's window, a flusher's burst, a scanner's
# few heap blocks. Each takes seconds at most on a healthy server, so one
# running for a minute is stuck (or the server is), and failing it lets the
# driver's error handling act.
STATEMENT_TIMEOUT_SECONDS = 60
# An account lock is held for one batch at a time. Waiting half a minute for a
# lock means its holder is stuck (e.g. a psql session left in a transaction);
# below the statement timeout, so the error (55P03) says it was a lock wait.
LOCK_TIMEOUT_SECONDS = 30
# A fetch API read is one primary-key lookup; a client is better served by an
# error than by a request that waits out the pool and the proxy.
READ_ONLY_STATEMENT_TIMEOUT_SECONDS = 5


def session_settings(*, read_only: bool = False, asynchronous_commit: bool = False) -> dict[str, str]:
    """The server settings of every connection this module makes."""
    settings = {
        "default_transaction_isolation": ISOLATION_LEVEL,
        "statement_timeout": f"{STATEMENT_TIMEOUT_SECONDS}s",
        "lock_timeout": f"{LOCK_TIMEOUT_SECONDS}s",
        "TimeZone": "UTC",
    }
    if asynchronous_commit:
        settings["synchronous_commit"] = "off"
    if read_only:
        settings["default_transaction_read_only"] = "on"
        settings["statement_timeout"] = f"{READ_ONLY_STATEMENT_TIMEOUT_SECONDS}s"
    return settings


def connection_kwargs(
    url: str, application_name: str, *, read_only: bool = False, asynchronous_commit: bool = False
) -> dict[str, Any]:
    """Connect keyword arguments: the session settings, a connect timeout and a name in pg_stat_activity."""
    name = application_name.encode()[:APPLICATION_NAME_MAX_BYTES].decode(errors="ignore")
    # libpq splits options at spaces, except those escaped with a backslash.
    options = " ".join(
        "-c " + setting + "=" + value.replace(" ", "\\ ")
        for setting, value in session_settings(read_only=read_only, asynchronous_commit=asynchronous_commit).items()
    )
    operator_options = conninfo_to_dict(url).get("options")
    return {
        "autocommit": False,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "application_name": name,
        "options": f"{options} {operator_options}" if operator_options else options,
    }


def connect(
    url: str,
    *,
    application_name: str = "pyswpt",
    read_only: bool = False,
    asynchronous_commit: bool = False,
    connect_timeout_seconds: int = CONNECT_TIMEOUT_SECONDS,
) -> psycopg.Connection:
    """One connection with autocommit off and the session settings; the caller closes it.

    With `asynchronous_commit` its commits do not wait for the WAL flush: only
    for the workers and the flushers (see the module's docstring).
    """
    kwargs = connection_kwargs(url, application_name, read_only=read_only, asynchronous_commit=asynchronous_commit)
    return psycopg.connect(url, **{**kwargs, "connect_timeout": connect_timeout_seconds})


def create_pool(
    url: str,
    *,
    min_size: int,
    max_size: int,
    name: str,
    timeout_seconds: float = POOL_TIMEOUT_SECONDS,
    read_only: bool = False,
) -> ConnectionPool:
    """A pool of autocommit-off connections, not yet open: call `pool.open()`.

    `name` names the pool in logs and the connections in pg_stat_activity.
    Each connection is checked when it is handed out, so a connection the
    server closed (restart, idle timeout) is replaced instead of failing a
    request. With `read_only` the server refuses writes, and statements get
    the shorter read-only timeout.
    """
    if not 0 <= min_size <= max_size or max_size < 1:
        raise ValueError(f"invalid pool size: min_size={min_size}, max_size={max_size}")
    return ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        timeout=timeout_seconds,
        max_lifetime=POOL_MAX_LIFETIME_SECONDS,
        max_idle=POOL_MAX_IDLE_SECONDS,
        kwargs=connection_kwargs(url, name, read_only=read_only),
        check=ConnectionPool.check_connection,
        open=False,
    )


def listen(url: str, channel: str, *, application_name: str) -> psycopg.Connection:
    """An autocommit connection LISTENing on `channel`; the caller closes it.

    Autocommit, so that the session is never idle in a transaction while it
    waits: NOTIFYs are delivered between transactions only. Queries run on it
    are single-statement transactions with the same settings as any other.
    """
    listener = connect(url, application_name=application_name)
    listener.autocommit = True
    listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    return listener


def wait_for_notifications(
    listener: psycopg.Connection, deadline: float, stopping: threading.Event, *, not_before: float = 0.0
) -> set[str]:
    """The payloads of the NOTIFYs that came until a first one did, the `time.monotonic()`
    deadline passed, or within a second after `stopping` was set; empty when none came.

    It returns no sooner than the `not_before` instant (unless stopping), with
    every NOTIFY that came until then: the caller's next round serves them all.
    """
    stopping.wait(max(0.0, min(not_before, deadline) - time.monotonic()))
    payloads: set[str] = set()
    while not payloads and not stopping.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        payloads.update(notify.payload for notify in listener.notifies(timeout=min(remaining, 1.0), stop_after=1))
    # And those already received: one round serves them all.
    payloads.update(notify.payload for notify in listener.notifies(timeout=0))
    return payloads


class SharedListener:
    """One LISTEN connection for the loops of a process, each waiting for NOTIFYs of its own payload.

    PostgreSQL wakes every listening session of a database on every NOTIFY,
    whatever the channel, so each LISTEN connection costs a server process's
    wake-up per notifying commit. One reader thread per process listens and
    sets the event of the payload it read; a lost connection is made again
    with backoff, and every loop is woken once it is back, since NOTIFYs sent
    meanwhile were not seen (the loops also poll, so none waits forever).
    """

    def __init__(self, url: str, channel: str, payloads: list[str], *, application_name: str) -> None:
        self.url = url
        self.channel = channel
        self.application_name = application_name
        self._events = {payload: threading.Event() for payload in payloads}

    def run_until_stopped(self, stopping: threading.Event) -> None:
        """The reader thread's body: listen, reconnecting after errors, until `stopping` is set."""
        backoff = Backoff()
        while not stopping.is_set():
            try:
                with listen(self.url, self.channel, application_name=self.application_name) as listener:
                    self._wake_all()
                    while not stopping.is_set():
                        for notify in listener.notifies(timeout=1.0):
                            if event := self._events.get(notify.payload):
                                event.set()
            except psycopg.Error as error:
                pause = backoff.next_pause()
                # Not transactions.describe_error: that module loads prometheus_client, which
                # pyswpt.cli must not import before the metrics directory is set.
                reason = " ".join(str(error).split()) or type(error).__name__
                logger.error("Lost the LISTEN connection (%s); listening again in %.0f s.", reason, pause)
                self._wake_all()
                stopping.wait(pause)

    def _wake_all(self) -> None:
        for event in self._events.values():
            event.set()

    def forget(self, payload: str) -> None:
        """Called before a loop looks for work: what was notified until now, the loop will see."""
        self._events[payload].clear()

    def wait(self, payload: str, deadline: float, stopping: threading.Event) -> None:
        """Return once `payload` was notified since `forget`, at the `time.monotonic()` deadline,
        or within a second after `stopping` is set."""
        event = self._events[payload]
        while not stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or event.wait(min(remaining, 1.0)):
                return
