"""`pyswpt audit` (issue 8): check the shard's invariants and print a table.

The checks are those of the SQL function audit_ledger (sql/functions/92_audit.sql),
run one by one, with their progress shown, in one read-only REPEATABLE READ
transaction, so that all figures come from one snapshot. Exit status 1 when a check found a VIOLATION; warnings (parked
messages) and information (money in transit) do not change it.

Conservation per debtor is a violation only when this shard holds every account
(binding key `#`); it cannot see changes in the broker, so run the audit with
the SMP queue drained to check it.
"""

from __future__ import annotations

import dataclasses
import json

import psycopg

from pyswpt import db, progress, queries
from pyswpt.config import Config

# Offending keys printed per check; the count says how many there are in all.
MAX_KEYS_PER_CHECK = 5
VIOLATION = "VIOLATION"

NO_STATEMENT_TIMEOUT = "SET LOCAL statement_timeout = 0"
HEADERS = ("check", "status", "count", "first found")


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One row of audit_ledger: a check, its status, what it found and what it checks."""

    check_name: str
    status: str
    found_count: int
    first_keys: list[str]
    detail: str


def run_checks(
    conn: psycopg.Connection, holds_every_account: bool, progress_interval_seconds: float
) -> list[CheckResult]:
    """Every check, from one snapshot of the database, one statement each so that progress shows.

    REPEATABLE READ takes the snapshot at the first statement and keeps it
    until the commit: the checks agree with each other as if run in one call.
    """
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    results = []
    with conn.transaction():
        # The audit reads whole tables once: on a big shard that outlasts the drivers'
        # statement timeout. It is read-only; the lock timeout still bounds its waits.
        conn.execute(NO_STATEMENT_TIMEOUT)
        checks = conn.execute(queries.LIST_AUDIT_CHECKS).fetchall()
        total_blocks = sum(block_count for _, block_count in checks)
        with progress.track("audit", total_blocks, " blocks", progress_interval_seconds) as shown:
            for check_name, block_count in checks:
                params = {"check_name": check_name, "holds_every_account": holds_every_account}
                found = conn.execute(queries.RUN_AUDIT_CHECK, {**params, "max_keys": MAX_KEYS_PER_CHECK}).fetchall()
                results += [CheckResult(*row) for row in found]
                shown.update(block_count)
    return results


def format_table(results: list[CheckResult]) -> str:
    """A plain text table, one line per check; then what each check that is not ok checks."""
    lines = [
        (result.check_name, result.status, str(result.found_count), "; ".join(result.first_keys)) for result in results
    ]
    widths = [max(len(row[column]) for row in [HEADERS, *lines]) for column in range(len(HEADERS) - 1)]
    table = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        for row in [HEADERS, *lines]
    ]
    details = [f"{result.check_name}: {result.detail}" for result in results if result.status != "ok"]
    return "\n".join([*table, *([""] + details if details else [])])


def has_violation(results: list[CheckResult]) -> bool:
    return any(result.status == VIOLATION for result in results)


def audit(config: Config, *, as_json: bool) -> int:
    """Print the checks (a table, or JSON); 1 if any found a violation, else 0."""
    with db.connect(config.operator_postgres_url, application_name="pyswpt audit") as conn:
        results = run_checks(conn, config.realm.mask == 0, config.progress_interval_seconds)
    if as_json:
        print(json.dumps({"checks": [dataclasses.asdict(result) for result in results]}, indent=2))
    else:
        print(format_table(results))
    return 1 if has_violation(results) else 0
