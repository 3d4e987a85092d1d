"""`pyswpt configure` and `yoyo apply` are idempotent (spec 01 §8.1).

Each test makes its own empty database and drops it afterwards, and runs the
commands as an operator would: as programs, with settings in the environment.
The functions in sql/functions/ change while the project grows, so the
snapshots compare one run with the next and never name a function.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yoyo
from logins import as_login, ensure_login
from psycopg import sql

from pyswpt import schema, topology

REPOSITORY = Path(__file__).resolve().parent.parent
FUNCTIONS_DIR = REPOSITORY / "sql" / "functions"
BIN_DIR = Path(sys.executable).parent
COMMAND_TIMEOUT_SECONDS = 180
DONE_LINES = [
    "Running database schema upgrade ... done.",
    "Creating chores queue ... done.",
    "Setting up message broker objects ... done.",
]
# A login user without CREATEROLE, shared by the server's test sessions and never dropped.
CONFIGURER_LOGIN = "pyswpt_test_configurer_login"
# A narrow shard, so that the test queue catches few of the messages other
# tests publish to `accounts_in` while it exists.
TEST_BINDING_KEY = "1.0.1.1.0.1.#"

# The data schema and the two schemas 9999_functions re-creates on every run.
SCHEMAS = "('pyswpt', 'pyswpt_api', 'pyswpt_private')"
# What an upgrade could change, each as rows in a fixed order.
SNAPSHOT_QUERIES = {
    "relations": f"""
        SELECT n.nspname, c.relname, c.relkind::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN {SCHEMAS}
        ORDER BY 1, 2
    """,
    "columns": f"""
        SELECT table_schema, table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns
        WHERE table_schema IN {SCHEMAS}
        ORDER BY table_schema, table_name, ordinal_position
    """,
    "constraints": f"""
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname IN {SCHEMAS}
        ORDER BY 1, 2
    """,
    "indexes": f"""
        SELECT tablename, indexname, indexdef
        FROM pg_indexes
        WHERE schemaname IN {SCHEMAS}
        ORDER BY 1, 2
    """,
    "triggers": f"""
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN {SCHEMAS} AND NOT t.tgisinternal
        ORDER BY 1, 2
    """,
    "types": f"""
        SELECT n.nspname, t.typname, t.typtype::text,
            (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
             FROM pg_enum e WHERE e.enumtypid = t.oid)
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname IN {SCHEMAS}
        ORDER BY 1, 2
    """,
    "functions": f"""
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname IN {SCHEMAS} AND p.prokind IN ('f', 'p')
        ORDER BY 1
    """,
    "privileges": f"""
        SELECT p.oid::regprocedure::text, p.proacl::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname IN {SCHEMAS}
        UNION ALL
        SELECT c.oid::regclass::text, c.relacl::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN {SCHEMAS}
        UNION ALL
        SELECT nspname, nspacl::text FROM pg_namespace WHERE nspname IN {SCHEMAS}
        ORDER BY 1
    """,
    "migrations": """
        SELECT migration_id, migration_hash, applied_at_utc::text
        FROM _yoyo_migration
        ORDER BY 1
    """,
}


@pytest.fixture
def broker_environment(rabbitmq_url: str) -> Iterator[dict[str, str]]:
    """Broker settings with queues unique to this test; the queues are deleted after it."""
    queue = f"pyswpt_test_configure_{uuid.uuid4().hex[:10]}"
    environment = {
        "PROTOCOL_BROKER_URL": rabbitmq_url,
        "PROTOCOL_BROKER_QUEUE": queue,
        "PROTOCOL_BROKER_QUEUE_ROUTING_KEY": TEST_BINDING_KEY,
        "CHORES_BROKER_URL": rabbitmq_url,
        "CHORES_BROKER_QUEUE": f"{queue}_chores",
    }
    yield environment
    with topology.open_channel(rabbitmq_url) as channel:
        for name in (queue, topology.dead_letter_queue_name(queue), f"{queue}_chores"):
            channel.queue_delete(name)


def run_program(arguments: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess:
    # Settings the test runner happens to have must not leak into the program.
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PROTOCOL_BROKER_", "CHORES_BROKER_", "APP_", "POSTGRES_"))
        and key != "SETUP_RABBITMQ_BINDINGS"
    }
    return subprocess.run(
        arguments,
        env={**inherited, **environment},
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )


def run_configure(database_url: str, environment: dict[str, str]) -> subprocess.CompletedProcess:
    return run_program(
        [str(BIN_DIR / "pyswpt"), "configure"],
        {**environment, "POSTGRES_URL": database_url, "SETUP_RABBITMQ_BINDINGS": "yes"},
    )


def run_yoyo_apply(database_url: str) -> subprocess.CompletedProcess:
    """`yoyo apply` in the repository, where yoyo.ini names the migrations."""
    yoyo_database = schema.yoyo_url(database_url)
    return run_program([str(BIN_DIR / "yoyo"), "apply", "--database", yoyo_database, "--batch"], {})


def succeeded(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def snapshot(database_url: str) -> dict[str, list[tuple]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET search_path = public")
        return {name: conn.execute(query).fetchall() for name, query in SNAPSHOT_QUERIES.items()}


def assert_same_snapshot(before: dict[str, list[tuple]], after: dict[str, list[tuple]]) -> None:
    for name in SNAPSHOT_QUERIES:
        assert after[name] == before[name], f"{name} changed on the second run"


def function_names_in_files(functions_dir: Path = FUNCTIONS_DIR) -> set[str]:
    """Qualified names of the functions and procedures that sql/functions/ defines, whichever they
    are today, and the one the installer makes itself (applied_migrations, which names yoyo's table)."""
    pattern = re.compile(r"CREATE\s+(?:FUNCTION|PROCEDURE)\s+(pyswpt_api|pyswpt_private)\.(\w+)\s*\(", re.IGNORECASE)
    installer = functions_dir.parent / "migrations" / "9999_functions.py"
    return {
        f"{schema}.{name}".lower()
        for path in [*functions_dir.glob("*.sql"), installer]
        for schema, name in pattern.findall(path.read_text(encoding="utf-8"))
    }


def installed_function_names(database_url: str) -> set[str]:
    """Qualified names of the functions in the two schemas that 9999_functions re-creates."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """
            SELECT n.nspname || '.' || p.proname
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname IN ('pyswpt_api', 'pyswpt_private')
            """
        ).fetchall()
    return {name for (name,) in rows}


# --- pyswpt configure --------------------------------------------------------------


def test_configure_on_a_new_database_reports_each_step_done(fresh_database_url, broker_environment):
    result = run_configure(fresh_database_url, broker_environment)

    assert succeeded(result), explain(result)
    done = [line for line in result.stdout.splitlines() if line.endswith("done.")]
    assert done == DONE_LINES, explain(result)


def test_configure_again_reports_each_step_done_and_changes_nothing(fresh_database_url, broker_environment):
    first = run_configure(fresh_database_url, broker_environment)
    assert succeeded(first), explain(first)
    before = snapshot(fresh_database_url)

    second = run_configure(fresh_database_url, broker_environment)

    assert succeeded(second), explain(second)
    assert [line for line in second.stdout.splitlines() if line.endswith("done.")] == DONE_LINES
    assert_same_snapshot(before, snapshot(fresh_database_url))


def test_configure_installs_exactly_the_functions_of_sql_functions(fresh_database_url, broker_environment):
    result = run_configure(fresh_database_url, broker_environment)

    assert succeeded(result), explain(result)
    assert function_names_in_files() == installed_function_names(fresh_database_url)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROTOCOL_BROKER_QUEUE_ROUTING_KEY", "2.#"),
        ("FLUSH_PROCESSES", "x"),
        ("APP_LOG_LEVEL", "loud"),
    ],
)
def test_configure_with_a_bad_setting_prints_one_line_naming_it(
    fresh_database_url, broker_environment, variable, value
):
    result = run_configure(fresh_database_url, {**broker_environment, variable: value})

    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, explain(result)
    assert variable in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_configure_drops_a_function_removed_from_sql_functions_and_changes_one_without_drop(
    fresh_database_url, broker_environment, tmp_path
):
    sql_copy = tmp_path / "sql"
    shutil.copytree(REPOSITORY / "sql", sql_copy)
    extra_file = sql_copy / "functions" / "99_test_extra.sql"
    environment = {**broker_environment, "PYSWPT_SQL_DIR": str(sql_copy)}

    extra_file.write_text(extra_function("p_old", "integer"))
    first = run_configure(fresh_database_url, environment)
    assert succeeded(first), explain(first)
    assert extra_function_signature(fresh_database_url) == ("p_old integer", "integer")

    # CREATE OR REPLACE refuses both a renamed parameter and another return type.
    extra_file.write_text(extra_function("p_new", "bigint"))
    second = run_configure(fresh_database_url, environment)
    assert succeeded(second), explain(second)
    assert extra_function_signature(fresh_database_url) == ("p_new integer", "bigint")

    extra_file.unlink()
    third = run_configure(fresh_database_url, environment)
    assert succeeded(third), explain(third)
    assert extra_function_signature(fresh_database_url) is None
    assert installed_function_names(fresh_database_url) == function_names_in_files(sql_copy / "functions")


def test_configure_upgrades_a_database_of_the_old_layout_in_one_run(fresh_database_url, broker_environment, tmp_path):
    install_old_layout(fresh_database_url, tmp_path)
    assert len(data_schema_functions_and_views(fresh_database_url)) > 50

    result = run_configure(fresh_database_url, broker_environment)

    assert succeeded(result), explain(result)
    assert data_schema_functions_and_views(fresh_database_url) == []
    assert installed_function_names(fresh_database_url) == function_names_in_files()
    with psycopg.connect(fresh_database_url) as conn:
        call = "SELECT pyswpt_api.is_reachable_account(p_debtor_id => 1, p_creditor_id => 2)"
        assert conn.execute(call).fetchone()[0] is False
        assert conn.execute("SELECT count(*) FROM pyswpt_api.accounts").fetchone()[0] == 0


def test_configure_without_createrole_prints_the_statements_for_a_dba_and_succeeds(
    fresh_database_url, broker_environment, tmp_path
):
    # Roles belong to the whole server, where other sessions create the real ones
    # and nobody drops them: a copy of sql/ names roles of this test alone instead.
    absent = f"pyswpt_test_absent_{uuid.uuid4().hex[:8]}"
    sql_copy = tmp_path / "sql"
    shutil.copytree(REPOSITORY / "sql", sql_copy)
    for path in (sql_copy / "roles.sql", sql_copy / "grants.sql"):
        path.write_text(re.sub(r"\bpyswpt_(driver|web|operator)\b", rf"{absent}_\1", path.read_text()))
    with psycopg.connect(fresh_database_url, autocommit=True) as admin:
        ensure_login(admin, CONFIGURER_LOGIN)
        database = admin.info.dbname
        admin.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(*map(sql.Identifier, (database, CONFIGURER_LOGIN)))
        )

    result = run_configure(
        as_login(fresh_database_url, CONFIGURER_LOGIN), {**broker_environment, "PYSWPT_SQL_DIR": str(sql_copy)}
    )

    assert succeeded(result), explain(result)
    assert f"CREATE ROLE {absent}_driver NOLOGIN;" in result.stdout
    assert f"GRANT USAGE ON SCHEMA pyswpt_api TO {absent}_web;" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    with psycopg.connect(fresh_database_url) as conn:
        assert conn.execute("SELECT to_regrole(%s)", (f"{absent}_driver",)).fetchone()[0] is None
        assert conn.execute("SELECT to_regclass('pyswpt_api.accounts')").fetchone()[0] is not None


def extra_function(parameter: str, return_type: str) -> str:
    return (
        f"CREATE FUNCTION pyswpt_private.test_extra({parameter} integer) RETURNS {return_type}\n"
        f"LANGUAGE sql IMMUTABLE RETURN {parameter} + 1;\n"
    )


def extra_function_signature(database_url: str) -> tuple[str, str] | None:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            """
            SELECT pg_get_function_arguments(oid), prorettype::regtype::text
            FROM pg_proc
            WHERE proname = 'test_extra' AND pronamespace = 'pyswpt_private'::regnamespace
            """
        ).fetchone()


# The migrations of the releases whose functions and views all lived in pyswpt.
OLD_LAYOUT_MIGRATIONS = ("0001_schema", "0003_prepared_transfer_requests", "0005_notifications", "0006_parked_messages")
NEW_LAYOUT_SCHEMAS = re.compile(r"\bpyswpt_(?:api|private)\.")
# Function files over tables that only later migrations create: those releases had none of them.
NEWER_THAN_OLD_LAYOUT = {"74_scan_passes.sql"}


def install_old_layout(database_url: str, tmp_path: Path) -> None:
    """The database as those releases left it: their migrations applied, and the
    functions and views of sql/functions/ installed into pyswpt, as they did."""
    migrations_dir = tmp_path / "old_migrations"
    migrations_dir.mkdir()
    for migration_id in OLD_LAYOUT_MIGRATIONS:
        for path in (REPOSITORY / "sql" / "migrations").glob(f"{migration_id}.*"):
            shutil.copy(path, migrations_dir)
    backend = yoyo.get_backend(schema.yoyo_url(database_url))
    with backend.lock():
        backend.apply_migrations(backend.to_apply(yoyo.read_migrations(str(migrations_dir))))
    with psycopg.connect(database_url) as conn:
        conn.execute("SET search_path = pyswpt, pg_temp")
        # Today's functions stand in for the old ones; the bodies that read columns
        # added since 0006 (enqueued_at) are not checked, as they never run here.
        conn.execute("SET check_function_bodies = off")
        for path in sorted(FUNCTIONS_DIR.glob("*.sql")):
            if path.name not in NEWER_THAN_OLD_LAYOUT:
                conn.execute(NEW_LAYOUT_SCHEMAS.sub("pyswpt.", path.read_text(encoding="utf-8")))
        # Those releases had no procedures (0007 drops functions only).
        procedures = conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE prokind = 'p' AND pronamespace = 'pyswpt'::regnamespace"
        ).fetchall()
        for (procedure,) in procedures:
            conn.execute(f"DROP PROCEDURE {procedure}")  # a name from the catalog, quoted by regprocedure


def data_schema_functions_and_views(database_url: str) -> list[str]:
    """What pyswpt holds besides tables, sequences, indexes and trigger functions."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """
            SELECT proname FROM pg_proc
            WHERE pronamespace = 'pyswpt'::regnamespace AND prorettype <> 'trigger'::regtype
            UNION ALL
            SELECT viewname FROM pg_views WHERE schemaname = 'pyswpt'
            """
        ).fetchall()
    return [name for (name,) in rows]


# --- yoyo apply ----------------------------------------------------------------------


def test_yoyo_apply_again_changes_nothing(fresh_database_url):
    first = run_yoyo_apply(fresh_database_url)
    assert succeeded(first), explain(first)
    before = snapshot(fresh_database_url)

    second = run_yoyo_apply(fresh_database_url)

    assert succeeded(second), explain(second)
    assert_same_snapshot(before, snapshot(fresh_database_url))
    assert function_names_in_files() == installed_function_names(fresh_database_url)


def test_yoyo_apply_reinstalls_functions_every_time(fresh_database_url):
    """A function changed by hand is put back by the next apply, with no new migration."""
    first = run_yoyo_apply(fresh_database_url)
    assert succeeded(first), explain(first)
    before = snapshot(fresh_database_url)
    from_files = function_names_in_files()
    signatures = [signature for signature, _definition in before["functions"] if signature.split("(")[0] in from_files]
    if not signatures:
        pytest.skip("sql/functions/ defines no function yet")
    signature = signatures[0]
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER FUNCTION {} SET work_mem = '64kB'").format(sql.SQL(signature)))
    assert snapshot(fresh_database_url)["functions"] != before["functions"]

    second = run_yoyo_apply(fresh_database_url)

    assert succeeded(second), explain(second)
    assert_same_snapshot(before, snapshot(fresh_database_url))


def test_configure_without_the_sql_folder_says_so_instead_of_applying_nothing(fresh_database_url, broker_environment):
    result = run_configure(fresh_database_url, {**broker_environment, "PYSWPT_SQL_DIR": "/nonexistent/sql"})

    assert result.returncode == 2, explain(result)
    assert result.stderr.splitlines() == [
        "pyswpt configure: no migrations in /nonexistent/sql/migrations;"
        " set PYSWPT_SQL_DIR to the folder holding migrations/ and functions/"
    ]


def test_no_driver_loads_the_migration_tool():
    # yoyo and sqlparse cost each process of `run all` about 3 MiB of resident memory,
    # and only configure and await-migrations use them.
    check = (
        "import importlib, sys, pyswpt.cli\n"
        "from pyswpt import processes, upgrades\n"
        "for driver in pyswpt.cli.DRIVERS.values():\n"
        "    importlib.import_module(f'pyswpt.drivers.{driver.module}')\n"
        "print(sorted({'yoyo', 'sqlparse'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
