"""Login users of the tests: roles belong to the whole server, which other test
sessions share, so they are created when missing and never dropped."""

from __future__ import annotations

import urllib.parse

import psycopg
from psycopg import sql

# Login users of the tests, one per group role of sql/roles.sql. Roles belong
# to the whole server, which other test sessions share: created when missing,
# never dropped, with a fixed password (needed where the server asks for one).
TEST_LOGIN_PASSWORD = "pyswpt_test"
TEST_LOGINS = {
    "driver": ("pyswpt_test_driver_login", "pyswpt_driver"),
    "web": ("pyswpt_test_web_login", "pyswpt_web"),
    "operator": ("pyswpt_test_operator_login", "pyswpt_operator"),
}


def ensure_login(conn: psycopg.Connection, login: str, group: str | None = None) -> None:
    """Create the login user unless it exists (without CREATEROLE), a member of `group` if one
    is given; another session may do the same at once."""
    membership = (
        sql.SQL("GRANT {} TO {};").format(sql.Identifier(group), sql.Identifier(login)) if group else sql.SQL("")
    )
    conn.execute(
        sql.SQL(
            """
            DO $$
            BEGIN
                BEGIN
                    IF to_regrole({login_literal}) IS NULL THEN
                        CREATE ROLE {login} LOGIN PASSWORD {password};
                    END IF;
                EXCEPTION
                    WHEN duplicate_object OR unique_violation THEN
                        NULL;
                END;
                BEGIN
                    {membership}
                EXCEPTION
                    WHEN unique_violation THEN
                        NULL;
                END;
            END;
            $$
            """
        ).format(
            login_literal=sql.Literal(login),
            login=sql.Identifier(login),
            password=sql.Literal(TEST_LOGIN_PASSWORD),
            membership=membership,
        )
    )


def as_login(url: str, login: str) -> str:
    """The same database URL, connecting as `login`."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{login}:{TEST_LOGIN_PASSWORD}@{host}"))
