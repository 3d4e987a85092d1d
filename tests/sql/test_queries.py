"""The list of SQL statements the Python side runs (pyswpt/queries.py) against the installed functions.

PREPARE resolves a statement fully — function names, argument names, argument
types and explicit casts — without running it, so every statement is checked
here without arranging any data.
"""

from __future__ import annotations

import pathlib
import re

import psycopg
import pytest

import pyswpt
from pyswpt import queries

PACKAGE_DIR = pathlib.Path(pyswpt.__file__).parent
QUERIES_FILE = PACKAGE_DIR / "queries.py"

STATEMENTS = {name: value for name, value in vars(queries).items() if name.isupper() and isinstance(value, str)}

PLACEHOLDER = re.compile(r"%\((\w+)\)s")
# A function of a pyswpt schema called in a string: `pyswpt_api.name(` or a formatted `pyswpt_api.{}(`.
PYSWPT_CALL = re.compile(r"pyswpt(?:_api|_private)?\.(?:\w+|\{\})\s*\(")
# An API call whose first argument is not in named notation (`p_name => …`).
POSITIONAL_CALL = re.compile(r"pyswpt_api\.\w+\((?!\s*(?:p_\w+\s*=>|\)))")
# A call of the API schema: the only functions a statement may call.
API_CALL = re.compile(r"pyswpt_api\.\w+\s*\(")
# A view of the API schema read in a statement: `FROM pyswpt_api.name`.
API_VIEW = re.compile(r"\bFROM\s+pyswpt_api\.\w+\s*$", re.MULTILINE)


def numbered(statement: str) -> str:
    """The statement with psycopg's `%(name)s` placeholders as PostgreSQL's `$n`, one number per name."""
    numbers: dict[str, int] = {}
    return PLACEHOLDER.sub(lambda match: f"${numbers.setdefault(match[1], len(numbers) + 1)}", statement)


def python_sources() -> dict[pathlib.Path, str]:
    """Every module of the package but queries.py."""
    return {path: path.read_text() for path in sorted(PACKAGE_DIR.rglob("*.py")) if path != QUERIES_FILE}


def test_the_list_holds_statements():
    assert len(STATEMENTS) >= 30
    for name, statement in STATEMENTS.items():
        assert API_CALL.search(statement) or API_VIEW.search(statement), name
        assert len(PYSWPT_CALL.findall(statement)) == len(API_CALL.findall(statement)), name


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_statement_resolves_against_the_installed_functions(conn: psycopg.Connection, name: str):
    # An empty search_path: only what the statement names itself (and pg_catalog) is found.
    conn.execute("SET search_path = ''")
    statement = STATEMENTS[name]
    if statement.lstrip().startswith("CALL"):
        # PostgreSQL prepares no CALL: it runs, for no accounts (the lists, `…_ids`), changing nothing.
        placeholders = set(PLACEHOLDER.findall(statement))
        conn.execute(statement, {key: [] if key.endswith("_ids") else None for key in placeholders})
        return
    # The name comes from pyswpt.queries, never from data.
    conn.execute(f"PREPARE {name.lower()} AS {numbered(statement)}")
    conn.execute(f"DEALLOCATE {name.lower()}")


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_statement_passes_every_argument_by_name(name: str):
    statement = STATEMENTS[name]
    assert "%s" not in statement, f"{name}: a positional placeholder"
    assert not POSITIONAL_CALL.search(statement), f"{name}: a function called in positional notation"
    for match in PLACEHOLDER.finditer(statement):
        before = statement[: match.start()]
        after = statement[match.end() :]
        # The dict key names the argument it fills, so that a call site reads like the SQL;
        # a placeholder that fills no argument says its type.
        by_name = re.search(rf"\bp_{match[1]}\s*=>\s*$", before)
        assert by_name or after.startswith("::"), f"{name}: %({match[1]})s does not fill p_{match[1]}"


def test_every_statement_is_used_in_the_package():
    used = "\n".join(python_sources().values())
    unused = [name for name in STATEMENTS if not re.search(rf"\bqueries\.{name}\b", used)]
    assert unused == []


def test_no_module_but_queries_calls_a_pyswpt_function():
    calls = [
        f"{path.relative_to(PACKAGE_DIR)}: {match[0]}"
        for path, source in python_sources().items()
        for match in PYSWPT_CALL.finditer(source)
    ]
    assert calls == []
