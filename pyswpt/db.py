"""PostgreSQL connections for the drivers: one connection, or a pool of them.

Connections start with autocommit off: every driver step is one explicit
transaction around one SQL function call, committed (or rolled back) as a
whole. Every blocking step has a timeout, so a dead server makes a driver fail
loudly instead of hanging.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

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


def connection_kwargs(application_name: str) -> dict[str, Any]:
    """Settings every driver connection gets: a connect timeout and a name in pg_stat_activity."""
    name = application_name.encode()[:APPLICATION_NAME_MAX_BYTES].decode(errors="ignore")
    return {
        "autocommit": False,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "application_name": name,
    }


def connect(url: str, *, application_name: str = "pyswpt") -> psycopg.Connection:
    """One connection with autocommit off; the caller closes it."""
    return psycopg.connect(url, **connection_kwargs(application_name))


def create_pool(
    url: str,
    *,
    min_size: int,
    max_size: int,
    name: str,
    timeout_seconds: float = POOL_TIMEOUT_SECONDS,
    configure: Callable[[psycopg.Connection], None] | None = None,
) -> ConnectionPool:
    """A pool of autocommit-off connections, not yet open: call `pool.open()`.

    `name` names the pool in logs and the connections in pg_stat_activity.
    Each connection is checked when it is handed out, so a connection the
    server closed (restart, idle timeout) is replaced instead of failing a
    request. `configure` runs once on each new connection.
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
        kwargs=connection_kwargs(name),
        configure=configure,
        check=ConnectionPool.check_connection,
        open=False,
    )


def listen(url: str, channel: str, *, application_name: str) -> psycopg.Connection:
    """An autocommit connection LISTENing on `channel`; the caller closes it."""
    listener = connect(url, application_name=application_name)
    listener.autocommit = True
    listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    return listener


def wait_for_notification(
    listener: psycopg.Connection,
    deadline: float,
    stopping: threading.Event,
    payload: str | None = None,
) -> None:
    """Return on a NOTIFY (with `payload`, if given), at the `time.monotonic()` deadline,
    or within a second after `stopping` is set."""
    while not stopping.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for notify in listener.notifies(timeout=min(remaining, 1.0)):
            if payload is None or notify.payload == payload:
                return
