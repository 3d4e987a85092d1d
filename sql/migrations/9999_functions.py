"""
Re-create the API schema and the private schema from sql/functions/, in one transaction.

pyswpt_api holds exactly what the drivers, the web server and operators may
call (SECURITY DEFINER entry points and views); pyswpt_private holds the
helpers. Both are dropped and created afresh on every run, then every file of
sql/functions/ is run in name order, so what is in the database is exactly
what is in sql/: a function removed from a file disappears, and a changed
parameter name or return type needs no DROP. Tables, sequences, indexes and
trigger functions live in pyswpt and are changed only by migrations.

This migration is never recorded as applied (see post-apply.py), so each
`yoyo apply` runs it again: a changed function needs no new migration.
"""

from pathlib import Path

from yoyo import step

FUNCTIONS_DIR = Path(__file__).resolve().parent.parent / "functions"

# The search_path of every function (each pins it with SET, or binds its names
# at creation with a SQL-standard body): tables and types, then helpers. The
# files qualify what they create, and calls of an entry point, by schema.
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


def install_functions(conn):
    cursor = conn.cursor()
    recreate_schemas(cursor)
    cursor.execute(f"SET LOCAL search_path = {FUNCTIONS_SEARCH_PATH}")
    for path in sorted(FUNCTIONS_DIR.glob("*.sql")):
        cursor.execute(path.read_text(encoding="utf-8"))
    # PostgreSQL lets PUBLIC execute every new function; here only explicit
    # grants may (a new schema already gives PUBLIC no USAGE).
    cursor.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pyswpt_api, pyswpt_private FROM PUBLIC")


steps = [step(install_functions)]
