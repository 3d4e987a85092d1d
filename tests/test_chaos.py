"""A short chaos run (benchmarks/chaos.py): faults and poison while transfers flow, then every check.

The long run is on demand: `python benchmarks/chaos.py --transfers 10000`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pika
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import chaos  # noqa: E402

SHORT_RUN = chaos.Settings(
    transfers=300,
    concurrency=20,
    accounts=20,
    fault_interval_seconds=1.0,
    poison_every=25,  # at least twelve poison messages: every kind at least once
    min_fault_rounds=1,  # every driver killed once, a forked worker, a backend, the broker connections, the node
    deadline_seconds=400.0,
)


@pytest.mark.parametrize(
    ("flush_processes", "drivers_in_processes"),
    [
        # The flusher a process with forked workers, killed like the other drivers.
        (2, {"web", "consumer", "flusher", "workers"}),
        # As `run all` runs it by default: a thread of the supervisor, killed with the whole node.
        (1, {"web", "consumer", "workers"}),
    ],
)
def test_transfers_survive_faults_and_poison_exactly_once(
    postgres_server_url, rabbitmq_url, tmp_path, flush_processes, drivers_in_processes
):
    run = dataclasses.replace(SHORT_RUN, flush_processes=flush_processes)
    assert set(chaos.drivers_in_processes(run.node_settings())) == drivers_in_processes
    # A client of another vhost (the run makes one of its own): the faults must leave it alone.
    parameters = pika.URLParameters(rabbitmq_url)
    parameters.heartbeat = 0  # idle for the whole run, and must not be closed for that either
    bystander = pika.BlockingConnection(parameters)
    try:
        report = chaos.run_chaos(postgres_server_url, rabbitmq_url, run, tmp_path)
        bystander.process_data_events(time_limit=0)  # raises if the broker closed it
    finally:
        if bystander.is_open:
            bystander.close()
    print(report.table())
    assert report.ok, report.table()
    assert report.injected.get("broker connection closed", 0) >= 1
    killed = {what.removeprefix("SIGKILL ") for what in report.injected if what.startswith("SIGKILL ")}
    assert drivers_in_processes | {chaos.NODE_KILLED.removeprefix("SIGKILL ")} <= killed
    poisoned = {what.removeprefix("poison: ") for what in report.injected if what.startswith("poison: ")}
    assert poisoned == {poison.kind for poison in chaos.POISON}
    assert report.injected.get("database backend terminated", 0) >= 1


def test_an_answer_parked_twice_for_one_request_counts_once():
    """A poison request delivered again after a crash (between its commit and its ack) is rejected
    twice: both answers are parked, and that is at-least-once delivery, not a second poison."""
    [unroutable] = [poison for poison in chaos.POISON if poison.source_kind == "outbox"]
    request = json.dumps({"coordinator_type": "zzz", "coordinator_id": 7, "coordinator_request_id": 1}).encode()
    answer = {"type": "RejectedTransfer", "coordinator_type": "zzz", "coordinator_id": 7, "coordinator_request_id": 1}
    parked_twice = [("outbox", "unroutable", json.dumps(answer).encode(), "RejectedTransfer")] * 2
    assert all(ok for *_row, ok in chaos.verify_parked([(unroutable, request)], parked_twice))

    other = {**answer, "coordinator_request_id": 2}  # a good request's answer, parked: a failure
    parked_too = [*parked_twice, ("outbox", "unroutable", json.dumps(other).encode(), "RejectedTransfer")]
    [*_, total] = chaos.verify_parked([(unroutable, request)], parked_too)
    assert total == ("parked messages in all", "1", "2", False)
