"""`pyswpt run scanners`: the three table scanners in threads of one process.

`pyswpt run all` runs them in threads of its supervisor instead (scan_every_table),
rather than as three `run scan-*` processes, which would each hold their own
copy of the interpreter and its libraries (about 40 MiB of resident memory
each) for work that waits most of the time. Each scanner keeps its own
connections, pace and error handling (engine.py).
"""

from __future__ import annotations

import threading

from pyswpt.config import Config
from pyswpt.drivers.scanners import accounts, engine, prepared_transfers, registered_balance_changes


def run(config: Config) -> int:
    return engine.run_scanners(config, every_scanner(config))


def scan_every_table(config: Config, stopping: threading.Event) -> None:
    """The three scanners until `stopping` is set; raises the error of one that failed (engine.scan_in_threads)."""
    engine.scan_in_threads(config, every_scanner(config), stopping)


def every_scanner(config: Config) -> list[tuple[engine.TableScanner, engine.Pace]]:
    return [module.scanner_and_pace(config) for module in (accounts, prepared_transfers, registered_balance_changes)]
