"""Install and check the database schema: yoyo migrations plus sql/functions/."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import psycopg
import yoyo

from pyswpt import db, queries

logger = logging.getLogger(__name__)


def find_sql_dir() -> Path:
    """PYSWPT_SQL_DIR if set; else the sql/ an installed package carries as
    pyswpt/sql (see pyproject.toml); else the checkout's top-level sql/, which
    a checkout or an editable install runs from."""
    if override := os.environ.get("PYSWPT_SQL_DIR"):
        return Path(override)
    package_dir = Path(__file__).resolve().parent
    installed = package_dir / "sql"
    return installed if installed.is_dir() else package_dir.parent / "sql"


SQL_DIR = find_sql_dir()
MIGRATIONS_DIR = SQL_DIR / "migrations"
FUNCTIONS_DIR = SQL_DIR / "functions"

# Re-applied on every run by design (see sql/migrations/9999_functions.py).
FUNCTIONS_MIGRATION_ID = "9999_functions"

# The schemas of sql/migrations/9999_functions.py: the API (entry points and
# views) and the helpers; the tables and their trigger functions are in pyswpt.
API_SCHEMA = "pyswpt_api"
PRIVATE_SCHEMA = "pyswpt_private"
DATA_SCHEMA = "pyswpt"

# For sessions of the owner that call entry points and helpers by their bare
# names and read the tables (the tests and the benchmarks).
OWNER_SEARCH_PATH = f"{API_SCHEMA}, {PRIVATE_SCHEMA}, {DATA_SCHEMA}"


def missing_sql() -> str | None:
    """Why the migrations cannot be found, or None: yoyo reads an absent folder as "nothing to do"."""
    if not any(MIGRATIONS_DIR.glob("*.sql")):
        return f"no migrations in {MIGRATIONS_DIR}; set PYSWPT_SQL_DIR to the folder holding migrations/ and functions/"
    return None


def yoyo_url(postgres_url: str) -> str:
    """yoyo's name for PostgreSQL through psycopg 3."""
    scheme, sep, rest = postgres_url.partition("://")
    if not sep:
        raise ValueError("POSTGRES_URL must look like postgresql://user:password@host:port/database")
    return f"postgresql+psycopg://{rest}"


def apply_migrations(postgres_url: str) -> list[str]:
    """Apply pending migrations and re-install the functions; return what was applied."""
    backend = yoyo.get_backend(yoyo_url(postgres_url))
    migrations = yoyo.read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending if m.id != FUNCTIONS_MIGRATION_ID]


def is_installer_warning(filename: str) -> bool:
    """Whether a warning comes from sql/migrations/9999_functions.py (missing database roles)."""
    return Path(filename).name == f"{FUNCTIONS_MIGRATION_ID}.py"


def pending_schema_migrations(postgres_url: str) -> list[str]:
    """Schema migrations not applied yet (the functions re-install does not count): every
    one while the database has no API schema. Asks the API schema (LIST_APPLIED_MIGRATIONS),
    so that a driver's role, which may not read yoyo's table, can wait for an upgrade."""
    migrations = [m.id for m in yoyo.read_migrations(str(MIGRATIONS_DIR)) if m.id != FUNCTIONS_MIGRATION_ID]
    with db.connect(postgres_url, application_name="pyswpt await-migrations") as conn:
        try:
            applied = {row[0] for row in conn.execute(queries.LIST_APPLIED_MIGRATIONS)}
        except (psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedFunction):
            applied = set()
    return [migration_id for migration_id in migrations if migration_id not in applied]


def migration_state(postgres_url: str) -> tuple[list[str], list[str], int]:
    """The schema migrations this pyswpt has, those of them not applied, and how many
    applied ones it does not have (a newer pyswpt applied them)."""
    backend = yoyo.get_backend(yoyo_url(postgres_url))
    migrations = [m for m in yoyo.read_migrations(str(MIGRATIONS_DIR)) if m.id != FUNCTIONS_MIGRATION_ID]
    applied_hashes = set(backend.get_applied_migration_hashes())
    known_hashes = {m.hash for m in migrations}
    pending = [m.id for m in migrations if m.hash not in applied_hashes]
    return [m.id for m in migrations], pending, len(applied_hashes - known_hashes)
