"""The connection factory (pyswpt.db): every connection has the same explicit session settings."""

from __future__ import annotations

import threading
import time
import urllib.parse

import psycopg
import pytest

from pyswpt import db

SETTINGS = (
    "transaction_isolation",
    "statement_timeout",
    "lock_timeout",
    "transaction_read_only",
    "TimeZone",
    "synchronous_commit",
)


def session(conn: psycopg.Connection) -> dict[str, str]:
    return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in SETTINGS}


DRIVER_SESSION = {
    "transaction_isolation": "repeatable read",
    "statement_timeout": "1min",
    "lock_timeout": "30s",
    "transaction_read_only": "off",
    "TimeZone": "UTC",
    "synchronous_commit": "on",
}


def test_driver_connections_run_at_repeatable_read_with_timeouts(fresh_database_url):
    with db.connect(fresh_database_url) as conn:
        assert not conn.autocommit
        assert session(conn) == DRIVER_SESSION


def test_a_listening_connection_is_in_autocommit_with_the_same_settings(fresh_database_url):
    # Synchronous commits too: the flusher's durability barriers run on its listener.
    with db.listen(fresh_database_url, "some_channel", application_name="pyswpt test") as listener:
        assert listener.autocommit
        assert session(listener) == DRIVER_SESSION


def test_a_connection_for_asynchronous_commits_differs_in_that_only(fresh_database_url):
    with db.connect(fresh_database_url, asynchronous_commit=True) as conn:
        assert session(conn) == {**DRIVER_SESSION, "synchronous_commit": "off"}


def test_read_only_pool_connections_refuse_writes_and_time_out_sooner(fresh_database_url):
    with db.create_pool(fresh_database_url, min_size=1, max_size=1, name="pyswpt test", read_only=True) as pool:
        with pool.connection() as conn:
            assert session(conn) == {**DRIVER_SESSION, "statement_timeout": "5s", "transaction_read_only": "on"}
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("CREATE TABLE written (id integer)")


def test_options_in_the_operators_url_win(fresh_database_url):
    parts = urllib.parse.urlsplit(fresh_database_url)
    url = urllib.parse.urlunsplit(parts._replace(query="options=-c%20lock_timeout%3D7s"))
    with db.connect(url) as conn:
        assert session(conn) == {**DRIVER_SESSION, "lock_timeout": "7s"}


def test_t_infinity_loads_whatever_the_server_time_zone(fresh_database_url):
    # East of UTC, 9999-12-31T23:59:59Z is in year 10000, which a Python datetime cannot hold.
    dbname = urllib.parse.urlsplit(fresh_database_url).path.lstrip("/")
    with psycopg.connect(fresh_database_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE \"{dbname}\" SET TimeZone = 'Europe/Berlin'")
    with db.connect(fresh_database_url) as conn:
        moment = conn.execute("SELECT '9999-12-31T23:59:59+00:00'::timestamptz").fetchone()[0]
    assert (moment.year, moment.utcoffset().total_seconds()) == (9999, 0)


CHANNEL = "pyswpt_test_channel"
# A wait that must end on a NOTIFY is given this long; one that must not, much less.
NOTIFIED_WITHIN_SECONDS = 10.0
NOT_NOTIFIED_SECONDS = 0.3
# A round gap (pyswpt.drivers.flusher.ROUND_GAP_SECONDS) long enough to see.
GAP_SECONDS = 0.2


@pytest.fixture
def shared_listener(fresh_database_url):
    """A SharedListener of payloads 'a' and 'b', its reader running in a thread, and a connection to notify with."""
    listener = db.SharedListener(fresh_database_url, CHANNEL, ["a", "b"], application_name="pyswpt test listen")
    stopping = threading.Event()
    reader = threading.Thread(target=listener.run_until_stopped, args=(stopping,))
    reader.start()
    try:
        with psycopg.connect(fresh_database_url, autocommit=True) as notifier:
            wait_until_listening(notifier)
            # Once listening, the reader wakes every loop (NOTIFYs before it were not seen).
            for payload in ("a", "b"):
                assert waited_seconds(listener, payload, NOTIFIED_WITHIN_SECONDS, stopping) < NOTIFIED_WITHIN_SECONDS
            yield listener, notifier, stopping
    finally:
        stopping.set()
        reader.join(NOTIFIED_WITHIN_SECONDS)
    assert not reader.is_alive()


def wait_until_listening(conn: psycopg.Connection) -> int:
    """The pid of the session that listens on CHANNEL, once there is one."""
    deadline = time.monotonic() + NOTIFIED_WITHIN_SECONDS
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pyswpt test listen'"
            " AND query LIKE 'LISTEN%%' AND state = 'idle'"
        ).fetchone()
        if row:
            return row[0]
        time.sleep(0.05)
    raise AssertionError("nothing listens")


def waited_seconds(listener: db.SharedListener, payload: str, seconds: float, stopping: threading.Event) -> float:
    started = time.monotonic()
    listener.wait(payload, started + seconds, stopping)
    return time.monotonic() - started


def test_a_shared_listener_wakes_the_loop_of_the_notified_payload_only(shared_listener):
    listener, notifier, stopping = shared_listener
    listener.forget("a")
    listener.forget("b")

    notifier.execute(f"NOTIFY {CHANNEL}, 'a'")

    assert waited_seconds(listener, "a", NOTIFIED_WITHIN_SECONDS, stopping) < NOTIFIED_WITHIN_SECONDS
    assert waited_seconds(listener, "b", NOT_NOTIFIED_SECONDS, stopping) >= NOT_NOTIFIED_SECONDS
    # A NOTIFY that came before the loop forgot is seen by the loop's next look for work, not by its wait.
    listener.forget("a")
    assert waited_seconds(listener, "a", NOT_NOTIFIED_SECONDS, stopping) >= NOT_NOTIFIED_SECONDS


def test_a_shared_listener_listens_again_after_losing_its_connection_and_wakes_every_loop(shared_listener):
    listener, notifier, stopping = shared_listener
    first = wait_until_listening(notifier)
    listener.forget("a")
    listener.forget("b")

    notifier.execute("SELECT pg_terminate_backend(%s)", (first,))

    # NOTIFYs sent while no one listened are lost: every loop is woken to look for work.
    assert waited_seconds(listener, "a", NOTIFIED_WITHIN_SECONDS + 2, stopping) < NOTIFIED_WITHIN_SECONDS + 2
    assert waited_seconds(listener, "b", NOTIFIED_WITHIN_SECONDS + 2, stopping) < NOTIFIED_WITHIN_SECONDS + 2
    deadline = time.monotonic() + NOTIFIED_WITHIN_SECONDS
    while wait_until_listening(notifier) == first and time.monotonic() < deadline:
        time.sleep(0.05)
    second = wait_until_listening(notifier)
    assert second != first
    listener.forget("b")
    notifier.execute(f"NOTIFY {CHANNEL}, 'b'")
    assert waited_seconds(listener, "b", NOTIFIED_WITHIN_SECONDS, stopping) < NOTIFIED_WITHIN_SECONDS


@pytest.fixture
def listener_and_notifier(fresh_database_url):
    with (
        db.listen(fresh_database_url, CHANNEL, application_name="pyswpt test listen") as listener,
        psycopg.connect(fresh_database_url, autocommit=True) as notifier,
    ):
        yield listener, notifier


def test_waiting_for_notifications_not_before_an_instant_serves_every_notify_until_then(listener_and_notifier):
    # The flusher's round gap: the NOTIFYs of the commits meanwhile wake one round, not one each.
    listener, notifier = listener_and_notifier
    notifier.execute(f"NOTIFY {CHANNEL}, 'a'")
    notifier.execute(f"NOTIFY {CHANNEL}, 'b'")
    not_before = time.monotonic() + GAP_SECONDS
    payloads = db.wait_for_notifications(
        listener, not_before + NOTIFIED_WITHIN_SECONDS, threading.Event(), not_before=not_before
    )
    assert time.monotonic() >= not_before
    assert payloads == {"a", "b"}


def test_waiting_for_notifications_after_the_instant_returns_with_what_came(listener_and_notifier):
    listener, notifier = listener_and_notifier
    notifier.execute(f"NOTIFY {CHANNEL}, 'a'")
    started = time.monotonic()
    payloads = db.wait_for_notifications(listener, started + 600, threading.Event(), not_before=started - GAP_SECONDS)
    assert payloads == {"a"}
    assert time.monotonic() - started < NOTIFIED_WITHIN_SECONDS


def test_waiting_for_notifications_stops_before_the_instant_when_told_to_stop(listener_and_notifier):
    listener, _notifier = listener_and_notifier
    stopping = threading.Event()
    stopping.set()
    started = time.monotonic()
    assert db.wait_for_notifications(listener, started + 600, stopping, not_before=started + 600) == set()
    assert time.monotonic() - started < NOTIFIED_WITHIN_SECONDS
