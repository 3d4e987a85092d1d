"""Compare two versions' end-to-end benchmark runs (run on demand, not a test).

Each side is one or more JSON files written by `end_to_end.py --json`. On a
shared machine one run says little about a change of a few percent, so run
each side more than once, in turns, from a checkout of its own (e.g. `git
worktree add`), and give every file to its side:

    for pass in 1 2; do
        for side in before after; do
            (cd /tmp/$side && .venv/bin/python benchmarks/end_to_end.py --no-pgbench \\
                --no-stand-in --seconds 25 --json /tmp/ab/$side-$pass.json)
        done
    done
    python benchmarks/compare.py --before /tmp/ab/before-*.json --after /tmp/ab/after-*.json

For each scenario it prints every run's transfers/s, server+PostgreSQL CPU
per transfer, that CPU divided by the load generator's, p50 prepare latency
and the load generator's CPU per transfer, and the change of their means,
after against before; a scenario whose checks failed on either side says so.
Trust the ratio over the CPU per transfer: the machine's pace drifts between
runs (by a quarter within an hour on the shared machines), and the load
generator's work per transfer stays the same, so dividing by its CPU takes
the drift out — unless the change alters how the node's messages reach the
load generator (batching them cuts its CPU too): where its own column moved,
judge the raw CPU over more passes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

LOAD_GENERATOR = "load generator"  # end_to_end.LOAD_GENERATOR, its process group in cpu_seconds


def server_per_load_generator(run: dict) -> float:
    """Server + PostgreSQL CPU over the load generator's in the run; NaN without the latter."""
    load_generator_seconds = run["cpu_seconds"].get(LOAD_GENERATOR, 0.0)
    if load_generator_seconds == 0:
        return math.nan
    return run["server_and_postgres_ms_per_transfer"] * run["transfers"] / 1000 / load_generator_seconds


def load_generator_ms(run: dict) -> float:
    """The load generator's CPU ms per transfer; NaN for a run without transfers."""
    if run["transfers"] == 0:
        return math.nan
    return run["cpu_seconds"].get(LOAD_GENERATOR, 0.0) * 1000 / run["transfers"]


# A scenario's figures as end_to_end.as_json writes them, and how each is printed.
FIGURES: dict[str, tuple[Callable[[dict], float], str]] = {
    "transfers/s": (lambda run: run["transfers_per_second"], ".0f"),
    "server+PG CPU ms/transfer": (lambda run: run["server_and_postgres_ms_per_transfer"], ".2f"),
    "server+PG ÷ load generator CPU": (server_per_load_generator, ".2f"),
    # NaN for a run that saw no PreparedTransfer in its window.
    "prepare p50 ms": (lambda run: run["latencies_ms"]["prepare"].get("50", math.nan), ".0f"),
    # The ratio's divisor: steady while a change leaves the messages' pattern alone. A change that
    # batches what the node sends (the flusher's round gap) cut it by a fifth: judge that one raw.
    "load generator CPU ms/transfer": (load_generator_ms, ".2f"),
}


def scenario_key(run: dict) -> tuple[str, str, int, int]:
    s = run["scenario"]
    return s["profile"], s["placement"], s["concurrency"], s["idle_accounts"]


def load_runs(paths: list[Path]) -> dict[tuple[str, str, int, int], list[dict]]:
    """Every scenario run in the files, by scenario, in the order of the files."""
    runs: dict[tuple[str, str, int, int], list[dict]] = {}
    for path in paths:
        for run in json.loads(path.read_text())["scenarios"]:
            runs.setdefault(scenario_key(run), []).append(run)
    return runs


def change(before: list[float], after: list[float]) -> str:
    """After's mean against before's; "–" where before's is zero or unknown."""
    base = statistics.mean(before)
    if base == 0 or math.isnan(base):
        return "–"
    return f"{100 * (statistics.mean(after) / base - 1):+.1f} %"


def comparison_table(before: dict, after: dict) -> list[str]:
    """One markdown row per scenario measured on both sides; the others listed after it."""
    header = " | ".join(f"{name} before → after | change" for name in FIGURES)
    lines = [
        f"| settings | placement | C | idle accounts | runs | {header} | checks |",
        "|---|---|---|---|---|" + "---|---|" * len(FIGURES) + "---|",
    ]
    for key in sorted(before.keys() & after.keys()):
        cells = []
        for figure, spec in FIGURES.values():
            b, a = [figure(run) for run in before[key]], [figure(run) for run in after[key]]
            cells.append(
                f"{', '.join(format(v, spec) for v in b)} → {', '.join(format(v, spec) for v in a)} | {change(b, a)}"
            )
        checks = "ok" if all(run["ok"] for run in before[key] + after[key]) else "FAILED"
        lines.append(
            f"| {' | '.join(str(part) for part in key)} | {len(before[key])}/{len(after[key])}"
            f" | {' | '.join(cells)} | {checks} |"
        )
    for side, runs, other in (("before", before, after), ("after", after, before)):
        lines.extend(
            f"\nOnly {side}: {' '.join(str(part) for part in key)}" for key in sorted(runs.keys() - other.keys())
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, nargs="+", required=True, help="end_to_end.py --json files")
    parser.add_argument("--after", type=Path, nargs="+", required=True, help="end_to_end.py --json files")
    args = parser.parse_args()
    print("\n".join(comparison_table(load_runs(args.before), load_runs(args.after))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
