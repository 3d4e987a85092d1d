"""The named flag bits (sql/functions/05_flags.sql, pyswpt/flags.py) against spec 02 §1.11."""

from __future__ import annotations

import re

import psycopg
import pytest

from pyswpt import flags
from pyswpt.schema import FUNCTIONS_DIR

# The bit values of spec 02 §0 and §1.11, written out here on purpose.
SPEC_STATUS_DELETED = 1
SPEC_STATUS_OVERFLOWN = 2
SPEC_CONFIG_SCHEDULED_FOR_DELETION = 1

# Flags with no bit, each bit alone, both, every bit, and the int32 extremes.
FLAG_VALUES = [0, 1, 2, 3, 4, 0x1FF0, 0x1FFF, -1, -2, -3, -2147483648, 2147483647]

PREDICATES = {
    "account_is_deleted": SPEC_STATUS_DELETED,
    "account_is_overflown": SPEC_STATUS_OVERFLOWN,
    "config_is_scheduled_for_deletion": SPEC_CONFIG_SCHEDULED_FOR_DELETION,
}
SETTERS = {
    "with_deleted_flag": lambda f: f | SPEC_STATUS_DELETED,
    "without_deleted_flag": lambda f: f & ~SPEC_STATUS_DELETED,
    "with_overflown_flag": lambda f: f | SPEC_STATUS_OVERFLOWN,
}
FLAG_FUNCTIONS = sorted([*PREDICATES, *SETTERS])

# A flags column masked by hand: `status_flags & 1`, `config_flags | 2`, `x_flags & ~1`, `1 & status_flags`.
BARE_MASK = re.compile(r"\w+_flags\s*(?:&|\|(?!\|))\s*~?\s*\d|\d\s*(?:&|\|(?!\|))\s*\w+_flags\b")


def call(conn: psycopg.Connection, function: str, value: int):
    # The name comes from the lists above, never from data.
    return conn.execute(f"SELECT {function}(%s::integer)", (value,)).fetchone()[0]


def test_python_flag_bits_are_the_spec_values():
    assert (flags.STATUS_DELETED, flags.STATUS_OVERFLOWN, flags.CONFIG_SCHEDULED_FOR_DELETION) == (
        SPEC_STATUS_DELETED,
        SPEC_STATUS_OVERFLOWN,
        SPEC_CONFIG_SCHEDULED_FOR_DELETION,
    )


@pytest.mark.parametrize(("function", "bit"), PREDICATES.items())
def test_flag_predicate_reads_only_its_spec_bit(conn, function, bit):
    assert {value: call(conn, function, value) for value in FLAG_VALUES} == {
        value: value & bit != 0 for value in FLAG_VALUES
    }


@pytest.mark.parametrize(("function", "expected"), SETTERS.items())
def test_flag_setter_changes_only_its_spec_bit(conn, function, expected):
    assert {value: call(conn, function, value) for value in FLAG_VALUES} == {
        value: expected(value) for value in FLAG_VALUES
    }


def test_flag_functions_are_inlinable_sql_standard_bodies(conn):
    # PostgreSQL inlines an immutable SQL function with a SQL-standard body and
    # no SET clause; PL/pgSQL, SECURITY DEFINER or a SET clause would prevent it.
    rows = conn.execute(
        """
        SELECT p.proname, l.lanname, p.prosqlbody IS NOT NULL, p.provolatile, p.prosecdef, p.proconfig
        FROM pg_proc AS p
        JOIN pg_language AS l ON l.oid = p.prolang
        WHERE p.pronamespace = 'pyswpt_private'::regnamespace
            AND p.proname = ANY(%s)
        ORDER BY p.proname
        """,
        (FLAG_FUNCTIONS,),
    ).fetchall()
    assert rows == [(name, "sql", True, "i", False, None) for name in FLAG_FUNCTIONS]


def plan(conn: psycopg.Connection, where: str) -> str:
    rows = conn.execute(f"EXPLAIN (VERBOSE, COSTS OFF) SELECT creditor_id FROM account WHERE {where}")
    # A server that loads pg_stat_statements adds the statement's identifier, which differs by text.
    return "\n".join(row[0] for row in rows if not row[0].lstrip().startswith("Query Identifier:"))


def test_flag_predicates_in_a_scan_are_planned_as_the_bare_masks(conn):
    # Inlined: the plan is the one of the bare masks, so a scan keeps its plan
    # (and would keep an index on the mask expression).
    named = plan(
        conn,
        "debtor_id = 1 AND NOT account_is_deleted(status_flags) AND config_is_scheduled_for_deletion(config_flags)",
    )
    assert named == plan(conn, "debtor_id = 1 AND status_flags & 1 = 0 AND config_flags & 1 <> 0")
    assert "Index Cond" in named and "account_is_deleted" not in named


def test_no_function_file_masks_a_flags_column_by_hand():
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(FUNCTIONS_DIR.glob("*.sql"))
        if path.name != "05_flags.sql"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if BARE_MASK.search(line.split("--", 1)[0])
    ]
    assert offenders == []


def test_bare_mask_pattern_catches_the_forms_it_forbids():
    forbidden = [
        "status_flags & 1 <> 0",
        "a.config_flags & 1 = 0",
        "f := f.status_flags | 2;",
        "status_flags & ~1",
        "1 & status_flags",
    ]
    allowed = ["account_is_deleted(status_flags)", "config_flags || 'x'", "p_config_flags,", "with_deleted_flag(x)"]
    assert [bool(BARE_MASK.search(line)) for line in forbidden] == [True] * len(forbidden)
    assert [bool(BARE_MASK.search(line)) for line in allowed] == [False] * len(allowed)
