"""`pyswpt run scanners`: the three table scanners in threads of one process.

`pyswpt run all` runs this instead of three `run scan-*` processes, which
would each hold their own copy of the interpreter and its libraries (about
40 MiB of resident memory each) for work that waits most of the time. Each
scanner keeps its own connections, pace and error handling (engine.py).
"""

from __future__ import annotations

from pyswpt.config import Config
from pyswpt.drivers.scanners import accounts, engine, prepared_transfers, registered_balance_changes


def run(config: Config) -> int:
    modules = (accounts, prepared_transfers, registered_balance_changes)
    return engine.run_scanners(config, [module.scanner_and_pace(config) for module in modules])
