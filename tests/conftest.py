"""Real servers for the tests: PostgreSQL and RabbitMQ.

Where a Docker engine answers, testcontainers starts throwaway servers.
Otherwise the servers named by PYSWPT_TEST_POSTGRES_URL and
PYSWPT_TEST_RABBITMQ_URL are used: each session creates its own database and
its own RabbitMQ vhost there (both deleted at the end) and never touches the
operator's ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import urllib.parse
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import vhosts
from logins import TEST_LOGINS, as_login, ensure_login
from psycopg import sql

from pyswpt import schema

POSTGRES_HOWTO = (
    "No PostgreSQL for the tests: start a Docker engine (testcontainers will run one), "
    "or set PYSWPT_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres "
    "to a server where the tests may create and drop a database."
)
RABBITMQ_HOWTO = (
    "No RabbitMQ for the tests: start a Docker engine (testcontainers will run one), "
    "or set PYSWPT_TEST_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2F (the tests make "
    "a vhost of their own there, with the management API or rabbitmqctl)."
)


def docker_is_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL of a PostgreSQL server on which the tests may create databases."""
    url = os.environ.get("PYSWPT_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not docker_is_reachable():
        pytest.fail(POSTGRES_HOWTO, pytrace=False)
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver=None) as container:
        yield container.get_connection_url()


@dataclasses.dataclass(frozen=True)
class RabbitmqServer:
    url: str  # its vhost is only a template: every session makes its own
    vhost_admin: vhosts.VhostAdmin


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitmqServer]:
    """A RabbitMQ server, and the way to make vhosts on it."""
    url = os.environ.get("PYSWPT_TEST_RABBITMQ_URL")
    if url:
        try:
            admin = vhosts.vhost_admin_for(url, os.environ.get(vhosts.MANAGEMENT_URL_VARIABLE))
        except vhosts.VhostAdminError as error:
            pytest.fail(str(error), pytrace=False)
        yield RabbitmqServer(url, admin)
        return
    if not docker_is_reachable():
        pytest.fail(RABBITMQ_HOWTO, pytrace=False)
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13-alpine") as container:
        params = container.get_connection_params()
        yield RabbitmqServer(
            f"amqp://guest:guest@{params.host}:{params.port}/%2F", vhosts.rabbitmqctl_in_container(container)
        )


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_server: RabbitmqServer) -> Iterator[str]:
    """URL of a vhost made for this test session and deleted after it (whatever
    happened), so that no other test node on the broker sees its messages."""
    try:
        with vhosts.own_vhost(rabbitmq_server.vhost_admin, rabbitmq_server.url, "pyswpt_test") as url:
            yield url
    except vhosts.VhostAdminError as error:
        pytest.fail(str(error), pytrace=False)


def with_database(url: str, dbname: str) -> str:
    """The same server URL, naming another database.

    Stays a URL (not a key=value conninfo): yoyo and POSTGRES_URL need one.
    """
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


@contextlib.contextmanager
def new_database(server_url: str, prefix: str) -> Iterator[str]:
    """A database made for the caller on the test server, dropped afterwards."""
    dbname = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield with_database(server_url, dbname)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


@pytest.fixture(scope="session")
def migrated_database_url(postgres_server_url: str) -> Iterator[str]:
    """A database made for this test session, with every migration and function applied."""
    with new_database(postgres_server_url, "pyswpt_test") as url:
        schema.apply_migrations(url)
        yield url


@pytest.fixture
def fresh_database_url(postgres_server_url: str) -> Iterator[str]:
    """A new database without the pyswpt schema, dropped when the test ends."""
    with new_database(postgres_server_url, "pyswpt_test_fresh") as url:
        yield url


def empty_all_tables(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'pyswpt'"
        ).fetchall()
        conn.execute(
            sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                sql.SQL(", ").join(sql.SQL(name) for (name,) in tables)
            )
        )


@pytest.fixture
def database_url(migrated_database_url: str) -> str:
    """URL of a migrated database whose tables are empty when the test starts."""
    empty_all_tables(migrated_database_url)
    return migrated_database_url


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to an empty, migrated database."""
    with contextlib.closing(psycopg.connect(database_url, autocommit=True)) as connection:
        connection.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
        yield connection


@pytest.fixture
def flushed_wal_records(conn: psycopg.Connection) -> Iterator[Callable[[str], list[tuple[str, str, str]]]]:
    """Reads the WAL records from a position up to the last one flushed to disk: (resource manager,
    record type, description) each. pg_walinspect (PostgreSQL's contrib) is installed for the test only.

    Raises when the position lies past the flushed WAL.
    """
    conn.execute("CREATE EXTENSION pg_walinspect SCHEMA public")
    try:
        yield lambda start: conn.execute(
            "SELECT resource_manager, record_type, description"
            " FROM public.pg_get_wal_records_info(%s, pg_current_wal_flush_lsn())",
            (start,),
        ).fetchall()
    finally:
        conn.execute("DROP EXTENSION pg_walinspect")


@pytest.fixture(scope="session")
def role_urls(migrated_database_url: str) -> dict[str, str]:
    """URLs of the session's database for a login user in each group role: driver, web, operator."""
    with psycopg.connect(migrated_database_url, autocommit=True) as conn:
        for login, group in TEST_LOGINS.values():
            ensure_login(conn, login, group)
    return {name: as_login(migrated_database_url, login) for name, (login, _group) in TEST_LOGINS.items()}
