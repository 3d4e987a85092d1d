"""`pyswpt await-migrations`: returns once every schema migration is applied."""

from __future__ import annotations

import os

from drivers import running, wait_for

from pyswpt import schema

WAITING_LINE = "Awaiting database migrations to be applied..."


def test_returns_at_once_on_a_migrated_database(database_url, tmp_path):
    environ = {**os.environ, "POSTGRES_URL": database_url}
    with running(["await-migrations"], environ, tmp_path) as waiting:
        wait_for(lambda: waiting.process.poll() is not None, "await-migrations to return")
    assert waiting.process.returncode == 0
    assert waiting.log().startswith(WAITING_LINE)


def test_waits_until_the_migrations_are_applied(fresh_database_url, tmp_path):
    environ = {**os.environ, "POSTGRES_URL": fresh_database_url}
    with running(["await-migrations"], environ, tmp_path) as waiting:
        wait_for(lambda: WAITING_LINE in waiting.log(), "the waiting line")
        assert schema.pending_schema_migrations(fresh_database_url) != []
        waiting.assert_alive()

        schema.apply_migrations(fresh_database_url)

        wait_for(lambda: waiting.process.poll() is not None, "await-migrations to return", 30)
    assert waiting.process.returncode == 0
