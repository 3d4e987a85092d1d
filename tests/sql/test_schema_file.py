"""sql/schema.sql builds the same data schema as the migrations.

The file is there to be read; this test keeps it true. Both databases are
described by the same catalog queries (columns, constraints of tables and
domains, indexes, triggers, functions, comments, storage options) and
compared whole.
"""

from collections.abc import Iterator

import psycopg
import pytest
from conftest import new_database

from pyswpt import schema

SCHEMA_FILE = schema.SQL_DIR / "schema.sql"

# Each query lists one kind of object of the data schema, in a stable order,
# by what a reader of the file would see (names and definitions, never OIDs).
# Views and functions other than triggers come from functions/, not from here.
CATALOG_QUERIES = {
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attstorage, a.attnum
        FROM pg_attribute AS a
        JOIN pg_class AS c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'pyswpt'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY c.relname, a.attnum
    """,
    "table options": """
        SELECT relname, relkind, reloptions
        FROM pg_class
        WHERE relnamespace = 'pyswpt'::regnamespace AND relkind IN ('r', 'i', 'S')
        ORDER BY relname
    """,
    "constraints": """
        SELECT coalesce(nullif(conrelid, 0)::regclass::text, contypid::regtype::text), conname,
               pg_get_constraintdef(oid)
        FROM pg_constraint
        WHERE connamespace = 'pyswpt'::regnamespace
        ORDER BY 1, 2
    """,
    "indexes": """
        SELECT tablename, indexname, indexdef
        FROM pg_indexes
        WHERE schemaname = 'pyswpt'
        ORDER BY tablename, indexname
    """,
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
        FROM pg_trigger
        WHERE NOT tgisinternal AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'pyswpt'::regnamespace)
        ORDER BY 1, 2
    """,
    "functions": """
        SELECT proname, pg_get_function_identity_arguments(oid), pg_get_functiondef(oid)
        FROM pg_proc
        WHERE pronamespace = 'pyswpt'::regnamespace AND prorettype = 'trigger'::regtype
        ORDER BY 1, 2
    """,
    "comments": """
        SELECT c.relname, d.objsubid, d.description
        FROM pg_description AS d
        JOIN pg_class AS c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass
        WHERE c.relnamespace = 'pyswpt'::regnamespace AND c.relkind IN ('r', 'i', 'S')
        UNION ALL
        SELECT 'schema', 0, obj_description('pyswpt'::regnamespace, 'pg_namespace')
        UNION ALL
        SELECT p.proname, 0, obj_description(p.oid, 'pg_proc')
        FROM pg_proc AS p
        WHERE p.pronamespace = 'pyswpt'::regnamespace AND p.prorettype = 'trigger'::regtype
        ORDER BY 1, 2
    """,
}


def describe_data_schema(url: str) -> dict[str, list[tuple]]:
    with psycopg.connect(url) as conn:
        return {kind: conn.execute(query).fetchall() for kind, query in CATALOG_QUERIES.items()}


@pytest.fixture
def database_from_schema_file(postgres_server_url: str) -> Iterator[str]:
    with new_database(postgres_server_url, "pyswpt_test_schema_file") as url:
        with psycopg.connect(url) as conn:
            conn.execute(SCHEMA_FILE.read_text(encoding="utf-8"))
        yield url


def test_schema_file_builds_what_the_migrations_build(migrated_database_url, database_from_schema_file):
    from_migrations = describe_data_schema(migrated_database_url)
    from_file = describe_data_schema(database_from_schema_file)
    for kind in CATALOG_QUERIES:
        assert from_file[kind] == from_migrations[kind], f"sql/schema.sql and the migrations differ in {kind}"


@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE pyswpt.transfer_request DROP CONSTRAINT locked_amounts_in_order",
        "ALTER DOMAIN pyswpt.account_transfer_id DROP CONSTRAINT last_transfer_id_not_negative",
    ],
)
def test_the_comparison_sees_a_missing_constraint(migrated_database_url, database_from_schema_file, statement):
    with psycopg.connect(database_from_schema_file) as conn:
        conn.execute(statement)
    differing = describe_data_schema(database_from_schema_file)["constraints"]
    assert differing != describe_data_schema(migrated_database_url)["constraints"]
