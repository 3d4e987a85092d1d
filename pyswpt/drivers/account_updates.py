"""Prompt AccountUpdates: a loop of the workers that announces changed accounts.

A committed transfer or an applied balance change only marks the account
(pending_account_update); the accounts scanner announces it on its pass,
APP_ACCOUNTS_SCAN_HOURS later. This loop calls send_due_account_updates about
five times per APP_ACCOUNT_UPDATE_DELAY_SECONDS, so a change reaches the
account holder within about that delay, and a busy account sends at most one
AccountUpdate per interval. The scanner stays the safety net: when this loop is
off (delay 0) or down, nothing is lost, only later.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

import psycopg

from pyswpt import db, queries
from pyswpt.backoff import Backoff
from pyswpt.config import Config
from pyswpt.transactions import at_read_committed, describe_error, with_retries

logger = logging.getLogger(__name__)

# Accounts announced per transaction, at most: bounds the locks one call holds.
MAX_ACCOUNTS_PER_CALL = 1000
# Polls per delay, and the bounds of the pause between polls.
POLLS_PER_DELAY = 5
MIN_POLL_SECONDS = 0.2
MAX_POLL_SECONDS = 2.0


def poll_seconds(config: Config) -> float:
    return min(max(config.account_update_delay_seconds / POLLS_PER_DELAY, MIN_POLL_SECONDS), MAX_POLL_SECONDS)


def announce_until_stopped(config: Config, stopping: threading.Event) -> None:
    """Announce due accounts until stopped, reconnecting with backoff after any error."""
    if config.account_update_delay_seconds == 0:
        return
    backoff = Backoff()
    while not stopping.is_set():
        try:
            with db.connect(config.driver_postgres_url, application_name="pyswpt account updates") as conn:
                announce_on(conn, config, stopping)
        except Exception as error:  # noqa: BLE001 - the loop must outlive any error (logged); the scanner is the net
            pause = backoff.next_pause()
            logger.error("Prompt AccountUpdates failed (%s); trying again in %.0f s.", describe_error(error), pause)
            stopping.wait(pause)


def announce_on(conn: psycopg.Connection, config: Config, stopping: threading.Event) -> None:
    pause = poll_seconds(config)
    while not stopping.is_set():
        announced = with_retries(conn, lambda c: send_due_account_updates(c, config))
        if announced < MAX_ACCOUNTS_PER_CALL:
            stopping.wait(pause)


def send_due_account_updates(conn: psycopg.Connection, config: Config) -> int:
    """One call, in the transaction the caller has just begun: up to MAX_ACCOUNTS_PER_CALL accounts
    that the workers are busy changing, so at READ COMMITTED (transactions.at_read_committed)."""
    at_read_committed(conn)
    params = {
        "min_interval_seconds": config.account_update_delay_seconds,
        "max_count": MAX_ACCOUNTS_PER_CALL,
        "realm_mask": config.realm.mask,
        "realm": config.realm.realm,
        "now": dt.datetime.now(dt.UTC),
    }
    return conn.execute(queries.SEND_DUE_ACCOUNT_UPDATES, params).fetchone()[0]
