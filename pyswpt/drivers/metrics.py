"""A metrics endpoint of its own (`pyswpt run metrics`): one for several processes.

It serves, on METRICS_PORT, what every process writes to PROMETHEUS_MULTIPROC_DIR
(drivers run one per container that share such a volume), and the figures read
from the database at scrape time (pyswpt.metrics): the endpoint that `pyswpt
run all` serves from its supervisor. Run without PROMETHEUS_MULTIPROC_DIR, it
serves the database's figures.
"""

from __future__ import annotations

from pyswpt import metrics
from pyswpt.config import Config
from pyswpt.processes import stop_event_on_signals


def run(config: Config) -> int:
    stopping = stop_event_on_signals()
    port = metrics.node_endpoint_port(config.metrics_port)
    server = metrics.serve(port, metrics.node_registry(config.driver_postgres_url))
    try:
        stopping.wait()
    finally:
        server.shutdown()
    return 0
