"""Python passes ruff's lint and format checks (pyproject.toml); sql/ passes sqlfluff (.sqlfluff)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_python_passes_ruff_lint():
    result = run_ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_is_formatted_by_ruff():
    result = run_ruff("format", "--no-cache", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_sql_passes_sqlfluff():
    result = subprocess.run(
        [sys.executable, "-m", "sqlfluff", "lint", "--nocolor", "sql"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
