"""pyswpt installed from a wheel, away from any checkout, carries sql/ and configures a database.

The wheel is built from a copy of what the Dockerfile copies to build the
package, so that building never writes into the checkout. The installed
package runs in a new venv whose own site-packages holds only the wheel; the
dependencies come from the test environment (installing them again would
take a minute).
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_configure import (
    COMMAND_TIMEOUT_SECONDS,
    DONE_LINES,
    broker_environment,  # noqa: F401 (a fixture)
    explain,
    function_names_in_files,
    installed_function_names,
)

from pyswpt import schema

REPOSITORY = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ["pyproject.toml", "README.md", "pyswpt", "sql"]


def checkout_files(directory: str, pattern: str) -> set[str]:
    """Files of the checkout under `directory` matching `pattern`, relative to the checkout."""
    return {
        path.relative_to(REPOSITORY).as_posix()
        for path in (REPOSITORY / directory).rglob(pattern)
        if "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (REPOSITORY / "pyswpt").is_dir():
        pytest.skip("needs a checkout (the image's tests run an installed pyswpt)")
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (REPOSITORY / name).is_dir():
            shutil.copytree(REPOSITORY / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPOSITORY / name, source / name)
    output = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(output), str(source)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, explain(result)
    (built,) = output.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed_bin_dir(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a new venv where the wheel is installed."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    (venv_site_packages,) = subprocess.run(
        [str(python), "-c", "import site; print(*site.getsitepackages())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    # The test environment's site-packages come after the venv's own, so its
    # pyswpt (if any) is hidden by the wheel's; an editable pyswpt there stays
    # out too, since the .pth files of a directory a .pth names are not run.
    Path(venv_site_packages, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, explain(result)
    return venv / "bin"


def test_the_wheel_carries_every_module_and_every_sql_file(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())

    assert checkout_files("pyswpt", "*.py") <= names
    sql_files = checkout_files("sql/migrations", "*") | checkout_files("sql/functions", "*.sql")
    assert any(name.endswith(".sql") for name in sql_files)
    assert {f"pyswpt/{name}" for name in sql_files} <= names


def test_an_installed_pyswpt_configures_a_new_database_from_anywhere(
    installed_bin_dir: Path, fresh_database_url: str, broker_environment: dict[str, str], tmp_path: Path
):
    # Nothing but PATH is inherited: no PYSWPT_SQL_DIR, no PYTHONPATH into the checkout.
    environment = {
        "PATH": f"{installed_bin_dir}:/usr/bin:/bin",
        **broker_environment,
        "POSTGRES_URL": fresh_database_url,
        "SETUP_RABBITMQ_BINDINGS": "yes",
    }
    result = subprocess.run(
        [str(installed_bin_dir / "pyswpt"), "configure"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )

    assert result.returncode == 0, explain(result)
    assert [line for line in result.stdout.splitlines() if line.endswith("done.")] == DONE_LINES
    assert schema.pending_schema_migrations(fresh_database_url) == []
    assert function_names_in_files() <= installed_function_names(fresh_database_url)
