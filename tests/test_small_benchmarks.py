"""benchmarks/consumer.py and benchmarks/transfers.py in runs small enough for the suite: they still run.

No figure is asserted (timings belong to the on-demand runs). A benchmark that
waits out its deadline fails here instead, as consumer.py did for
FinalizeTransfers once the consumer's windows finalized at once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import consumer  # noqa: E402
import transfers  # noqa: E402


@pytest.mark.parametrize("kind", sorted(consumer.MESSAGE_FACTORIES))
def test_consumer_benchmark_sees_every_message_committed(postgres_server_url, rabbitmq_url, monkeypatch, kind):
    monkeypatch.setattr(consumer, "DRAIN_TIMEOUT_SECONDS", 60.0)
    assert consumer.measure(postgres_server_url, rabbitmq_url, kind, 10, 50) > 0


def test_consumer_benchmark_rates_a_run_committed_between_two_polls(postgres_server_url):
    # CI once saw 0.0 here: 50 messages committed before the first poll that saw any.
    idle_consumer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with psycopg.connect(postgres_server_url) as conn:
            assert consumer.rate_until_done(conn, "SELECT 50", 50, idle_consumer) > 0
    finally:
        idle_consumer.kill()
        idle_consumer.wait()


def test_transfers_benchmark_runs_its_pairs_and_leaves_nothing_locked_or_queued(fresh_database_url):
    credit = transfers.set_up(fresh_database_url, 2)
    assert credit
    for scenario in ("hot", "spread"):
        result = transfers.run(fresh_database_url, scenario, 2, 10, 40, credit, "on")
        assert result.pairs == 40
    transfers.check_ledger(fresh_database_url)
