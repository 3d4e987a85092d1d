"""A very short end-to-end benchmark (benchmarks/end_to_end.py): it runs, measures and checks.

No figure is asserted (timings belong to the on-demand run); this proves that
a node, the stand-in and the checks work together, and that every process
group shows up in the CPU split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import end_to_end  # noqa: E402

SHORT_RUN = end_to_end.Options(
    profiles=("defaults",),
    placements=("spread", "hot"),
    concurrencies=(5,),
    accounts=10,
    seconds=3.0,
    warmup_seconds=1.0,
    idle_accounts=100,
    sql_profile=True,
    stand_in=True,
    pgbench=False,
    autovacuum_naptime=1.0,
)


def test_end_to_end_benchmark_measures_every_scenario_and_checks_the_ledger(
    postgres_server_url, rabbitmq_url, tmp_path
):
    results, ceilings = end_to_end.run(SHORT_RUN, postgres_server_url, rabbitmq_url, tmp_path)
    text = end_to_end.report(results, ceilings)
    print(text)

    assert "| vacuum during the scenarios | every 1 s, as autovacuum would" in text
    scenarios = {(m.scenario.placement, m.scenario.idle_accounts) for m in results}
    assert scenarios == {("spread", 0), ("hot", 0), ("spread", 100), ("hot", 100)}
    for m in results:
        assert m.ok, end_to_end.failed_checks([m])
        assert m.transfers > 0
        assert m.latencies_ms["prepare"] and m.latencies_ms["account transfer"]
        for half in ("prepare to ledger", "prepare from ledger"):  # split at the PreparedTransfer's prepared_at
            assert 0 <= m.latencies_ms[half][50] <= m.latencies_ms["prepare"][99]
        assert {"pyswpt all", "pyswpt consumer", "pyswpt workers", end_to_end.POSTGRES} <= set(m.cpu_seconds)
        assert m.cpu_seconds[end_to_end.POSTGRES] > 0 and m.total_rss_mib > 0
        assert sum(m.postgres_cpu_seconds.values()) == pytest.approx(m.cpu_seconds[end_to_end.POSTGRES])
        # The consumer prepares and finalizes at once where it can: the stages may have had nothing to do.
        connections = {"pyswpt flusher", "pyswpt workers listen", "pyswpt consumer QUEUE"}
        assert connections <= set(m.postgres_cpu_seconds)
        assert m.rss_mib["pyswpt workers"] > 0 and m.pss_mib["pyswpt workers"] > 0
        assert m.commits > 0 and m.wal_syncs > 0 and m.functions
        assert next(row for row in m.tables if row["table"] == "account")["index_scans"] > 0
    checks = {check for m in results for check, *_rest in m.checks}
    assert {"sum of the debtor's principals", "parked messages in all", "pyswpt audit exit status"} <= checks
    assert "processes of the node left after it stopped" in checks

    # The stand-in runs before the scenarios and again after them; the budget is the mean of the two.
    [stand_in], [stand_in_at_end] = ceilings.stand_in, ceilings.stand_in_at_end
    for run in (stand_in, stand_in_at_end):
        assert run.ok and run.transfers > 0 and run.cpu_seconds[end_to_end.STAND_IN] > 0
    budgets = [ceilings.budget_of(stand_in), ceilings.budget_of(stand_in_at_end)]
    assert ceilings.node_budget_ms(5) == pytest.approx(sum(budgets) / 2)
    assert "| stand-in C=5 at the end: " in text
    # The broker's raw rate on a quorum queue, with its CPU per message.
    assert ceilings.queue_rate.messages > 0 and ceilings.queue_rate.broker_cpu_seconds > 0
    assert "| one quorum queue, publisher confirms per 100 and consumer together: messages/s;" in text
    assert "| defaults | hot | 5 | 100 |" in text
    assert "## Memory MiB, RSS (PSS), by process" in text
    assert "| pyswpt consumer QUEUE | " in text
    assert "| table | sequential scans/transfer |" in text
    json.dumps(end_to_end.as_json(results, ceilings), default=str)


def measured(idle_accounts: int, transfers: int, node_seconds: float, load_generator_seconds: float):
    """A scenario of 10 s with this CPU for the node and the load generator."""
    return end_to_end.Measured(
        scenario=end_to_end.Scenario("compose", "spread", 100, idle_accounts),
        seconds=10.0,
        transfers=transfers,
        latencies_ms={},
        cpu_seconds={"pyswpt all": node_seconds, end_to_end.LOAD_GENERATOR: load_generator_seconds},
        postgres_cpu_seconds={},
        rss_mib={},
        pss_mib={},
    )


def test_the_idle_accounts_goal_is_judged_at_the_machines_pace():
    # With the idle accounts the machine ran 25 % slower: every process took 25 % more
    # CPU per transfer, the load generator's fixed work too, and 20 % fewer transfers fit.
    without = measured(0, transfers=5000, node_seconds=15.0, load_generator_seconds=2.0)
    slower = measured(1_000_000, transfers=4000, node_seconds=15.0, load_generator_seconds=2.0)
    rows = end_to_end.idle_goal_rows("compose", [without, slower])
    assert rows == [
        "| transfers/s with idle accounts ÷ without, spread C=100 | compose | within ±10% | -20.0% | 0.80 | – |",
        "| the same at the machine's pace, spread C=100 | compose | within ±10% | +0.0% | 1.00 | yes |",
        "| server+PG CPU/transfer with idle ÷ without, spread C=100 | compose | within ±10% | +25.0% | 1.25 | – |",
        "| the same at the machine's pace, spread C=100 | compose | within ±10% | +0.0% | 1.00 | yes |",
    ]
    # Costlier at the same pace: the node's CPU grows, the load generator's does not.
    costlier = measured(1_000_000, transfers=4000, node_seconds=15.0, load_generator_seconds=1.6)
    assert [row.rsplit("|", 2)[-2].strip() for row in end_to_end.idle_goal_rows("compose", [without, costlier])] == [
        "–",
        "no",
        "–",
        "no",
    ]
