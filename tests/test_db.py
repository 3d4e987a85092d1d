"""The connection factory (pyswpt.db): every connection has the same explicit session settings."""

from __future__ import annotations

import urllib.parse

import psycopg
import pytest

from pyswpt import db

SETTINGS = ("transaction_isolation", "statement_timeout", "lock_timeout", "transaction_read_only", "TimeZone")


def session(conn: psycopg.Connection) -> dict[str, str]:
    return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in SETTINGS}


DRIVER_SESSION = {
    "transaction_isolation": "repeatable read",
    "statement_timeout": "1min",
    "lock_timeout": "30s",
    "transaction_read_only": "off",
    "TimeZone": "UTC",
}


def test_driver_connections_run_at_repeatable_read_with_timeouts(fresh_database_url):
    with db.connect(fresh_database_url) as conn:
        assert not conn.autocommit
        assert session(conn) == DRIVER_SESSION


def test_a_listening_connection_is_in_autocommit_with_the_same_settings(fresh_database_url):
    with db.listen(fresh_database_url, "some_channel", application_name="pyswpt test") as listener:
        assert listener.autocommit
        assert session(listener) == DRIVER_SESSION


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
