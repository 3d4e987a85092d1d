"""Where the processes of a node write their metrics (prometheus_client's multiprocess mode).

prometheus_client decides when it is first imported whether each metric lives
in this process's memory or in a file of PROMETHEUS_MULTIPROC_DIR, which the
serving process sums over every process. So the variable must be set before
any module imports it: `pyswpt run` prepares the directory here, before it
imports a driver, and every process it starts or forks inherits the variable.
This module therefore never imports prometheus_client itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def is_set() -> bool:
    return bool(os.environ.get(VARIABLE))


@contextlib.contextmanager
def fresh_directory() -> Iterator[Path]:
    """A directory without metrics of earlier runs, named by PROMETHEUS_MULTIPROC_DIR while the block runs.

    The operator's PROMETHEUS_MULTIPROC_DIR (say, a tmpfs volume) is emptied of
    the files of earlier runs and kept; otherwise a temporary directory is made,
    and removed at the end.
    """
    given = os.environ.get(VARIABLE)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):
            old.unlink()
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="pyswpt-metrics-"))
    os.environ[VARIABLE] = str(path)
    try:
        yield path
    finally:
        del os.environ[VARIABLE]
        shutil.rmtree(path, ignore_errors=True)
