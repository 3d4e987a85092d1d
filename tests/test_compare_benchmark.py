"""benchmarks/compare.py reads end_to_end.py's JSON and compares the sides' means."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compare  # noqa: E402
import end_to_end  # noqa: E402


def measured(
    placement: str,
    transfers: int,
    server_cpu_seconds: float,
    prepare_p50_ms: float,
    ok: bool = True,
    load_generator_cpu_seconds: float = 1.0,
):
    return end_to_end.Measured(
        scenario=end_to_end.Scenario("compose", placement, 20),
        seconds=10.0,
        transfers=transfers,
        latencies_ms={"prepare": {50: prepare_p50_ms, 95: 2 * prepare_p50_ms}},
        cpu_seconds={
            "pyswpt consumer": server_cpu_seconds,
            end_to_end.POSTGRES: server_cpu_seconds,
            end_to_end.LOAD_GENERATOR: load_generator_cpu_seconds,
        },
        postgres_cpu_seconds={},
        rss_mib={},
        pss_mib={},
        checks=[("sum of the debtor's principals", "0", "0", ok)],
    )


def written(tmp_path: Path, name: str, *runs: end_to_end.Measured) -> Path:
    """A file as `end_to_end.py --json` writes it."""
    ceilings = end_to_end.Ceilings(cores=2, load_average_at_start=(0.0, 0.0, 0.0), stand_in=[], pgbench_tps={})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(end_to_end.as_json(list(runs), ceilings), default=str))
    return path


def test_the_change_of_the_means_of_each_scenario(tmp_path):
    before = [
        written(tmp_path, "before-1", measured("spread", 1000, 2.0, 30.0), measured("hot", 500, 1.0, 10.0)),
        written(tmp_path, "before-2", measured("spread", 3000, 4.0, 50.0)),
    ]
    after = [
        written(tmp_path, "after-1", measured("spread", 2200, 2.2, 36.0, load_generator_cpu_seconds=2.2)),
        written(tmp_path, "after-2", measured("spread", 2200, 2.2, 36.0, ok=False, load_generator_cpu_seconds=0.88)),
    ]
    lines = compare.comparison_table(compare.load_runs(before), compare.load_runs(after))

    [row] = [line for line in lines if line.startswith("| compose | spread |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:5] == ["compose", "spread", "20", "0", "2/2"]
    # Means: transfers/s 200 → 220; CPU ms (4 s / 1000, 8 s / 3000) 3.33 → 2; p50 40 → 36.
    assert cells[5:7] == ["100, 300 → 220, 220", "+10.0 %"]
    assert cells[7:9] == ["4.00, 2.67 → 2.00, 2.00", "-40.0 %"]
    # Server+PG CPU over the load generator's: 4 s / 1 s, 8 s / 1 s → 4.4 s / 2.2 s, 4.4 s / 0.88 s.
    assert cells[9:11] == ["4.00, 8.00 → 2.00, 5.00", "-41.7 %"]
    assert cells[11:13] == ["30, 50 → 36, 36", "-10.0 %"]
    # The load generator's CPU ms per transfer: 1 s / 1000, 1 s / 3000 → 2.2 s / 2200, 0.88 s / 2200.
    assert cells[13:15] == ["1.00, 0.33 → 1.00, 0.40", "+5.0 %"]
    assert cells[15] == "FAILED"
    assert "Only before: compose hot 20 0" in "\n".join(lines)


def test_a_side_without_transfers_has_no_change(tmp_path):
    empty = measured("spread", 0, 0.0, 0.0)
    empty.latencies_ms = {"prepare": {}}
    before = compare.load_runs([written(tmp_path, "before", empty)])
    after = compare.load_runs([written(tmp_path, "after", measured("spread", 100, 1.0, 5.0))])
    [row] = compare.comparison_table(before, after)[2:]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert (cells[5:7], cells[11:13], cells[13:15]) == (["0 → 10", "–"], ["nan → 5", "–"], ["nan → 10.00", "–"])


def test_the_load_generator_is_named_as_end_to_end_names_it():
    assert compare.LOAD_GENERATOR == end_to_end.LOAD_GENERATOR
