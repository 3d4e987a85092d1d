"""
Re-create the API schema and the private schema from sql/functions/, in one transaction.

pyswpt_api holds exactly what the drivers, the web server and operators may
call (SECURITY DEFINER entry points and views); pyswpt_private holds the
helpers. Both are dropped and created afresh on every run, then every file of
sql/functions/ is run in name order, so what is in the database is exactly
what is in sql/: a function removed from a file disappears, and a changed
parameter name or return type needs no DROP. Tables, domains, sequences,
indexes and trigger functions live in pyswpt and are changed only by
migrations. Then the group roles of sql/roles.sql get the rights of
sql/grants.sql.

This migration is never recorded as applied (see post-apply.py), so each
`yoyo apply` runs it again: a changed function needs no new migration.
"""

import warnings
from pathlib import Path

import psycopg
from psycopg import sql
from yoyo import step

SQL_DIR = Path(__file__).resolve().parent.parent
FUNCTIONS_DIR = SQL_DIR / "functions"
ROLES_FILE = SQL_DIR / "roles.sql"
GRANTS_FILE = SQL_DIR / "grants.sql"

# The search_path the functions are written for: tables and types, then
# helpers. The files qualify what they create, and calls of an entry point, by
# schema. Entry points pin it with SET; SQL-standard bodies bind their names
# when created; a PL/pgSQL helper runs in its caller's (README "Schema and
# functions").
FUNCTIONS_SEARCH_PATH = "pyswpt, pyswpt_private, pg_temp"

SCHEMA_COMMENTS = {
    "pyswpt_api": "The functions and views that drivers, the web server and operators may call or read.",
    "pyswpt_private": "Helpers of the pyswpt_api functions; not callable from outside.",
}


def recreate_schemas(cursor):
    for schema, comment in SCHEMA_COMMENTS.items():
        cursor.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        cursor.execute(f"CREATE SCHEMA {schema}")
        cursor.execute(f"COMMENT ON SCHEMA {schema} IS '{comment}'")


def install_applied_migrations(cursor):
    """pyswpt_api.applied_migrations(): the migrations yoyo recorded, for `pyswpt
    await-migrations` under a role that may not read yoyo's table. The table is
    where yoyo keeps it for this connection, so it is looked up here, before the
    search_path changes, and named in the function's body."""
    cursor.execute(
        "SELECT n.nspname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass('_yoyo_migration')"
    )
    (yoyo_schema,) = cursor.fetchone()
    cursor.execute(
        sql.SQL(
            """
            CREATE FUNCTION pyswpt_api.applied_migrations()
            RETURNS SETOF text
            LANGUAGE sql STABLE
            SECURITY DEFINER
            SET search_path = pyswpt, pyswpt_private, pg_temp
            AS $$ SELECT migration_id FROM {} $$
            """
        ).format(sql.Identifier(yoyo_schema, "_yoyo_migration"))
    )


def grant_roles(cursor):
    """Create the group roles if this user may, and grant them their rights.
    Where they are missing, warn with the statements a DBA can run: `pyswpt
    configure` prints the warning, `yoyo apply` shows it."""
    cursor.execute(ROLES_FILE.read_text(encoding="utf-8"))
    cursor.execute("SAVEPOINT grants")
    try:
        cursor.execute(GRANTS_FILE.read_text(encoding="utf-8"))
    except psycopg.errors.UndefinedObject:
        cursor.execute("ROLLBACK TO SAVEPOINT grants")
        warnings.warn(statements_for_a_dba(), stacklevel=1)
    else:
        cursor.execute("RELEASE SAVEPOINT grants")


def statements_for_a_dba():
    return (
        "The database roles of pyswpt are missing and this user may not create them (no CREATEROLE),"
        " so their grants were skipped. A DBA can run the following in this database"
        " (later configures grant the roles by themselves):\n\n"
        + ROLES_FILE.read_text(encoding="utf-8")
        + "\n"
        + GRANTS_FILE.read_text(encoding="utf-8")
    )


def install_functions(conn):
    cursor = conn.cursor()
    recreate_schemas(cursor)
    install_applied_migrations(cursor)
    cursor.execute(f"SET LOCAL search_path = {FUNCTIONS_SEARCH_PATH}")
    for path in sorted(FUNCTIONS_DIR.glob("*.sql")):
        cursor.execute(path.read_text(encoding="utf-8"))
    # PostgreSQL lets PUBLIC execute every new function and procedure; here only
    # the grants of sql/grants.sql may (a new schema already gives PUBLIC no USAGE).
    cursor.execute("REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA pyswpt_api, pyswpt_private FROM PUBLIC")
    grant_roles(cursor)


steps = [step(install_functions)]
