"""The node's metrics endpoint (`pyswpt run metrics`): one for every process of the node.

Under `pyswpt run all` it serves, on METRICS_PORT, what every driver and
worker process writes to the node's PROMETHEUS_MULTIPROC_DIR, and the figures
read from the database at scrape time (pyswpt.metrics). A process of its own,
so that the supervisor stays single-threaded (it forks the drivers) and a
failing endpoint is restarted like any driver without touching the others.
Run alone without PROMETHEUS_MULTIPROC_DIR, it serves the database's figures.
"""

from __future__ import annotations

from pyswpt import metrics
from pyswpt.config import Config
from pyswpt.processes import stop_event_on_signals


def run(config: Config) -> int:
    stopping = stop_event_on_signals()
    port = config.metrics_port if config.metrics_port is not None else metrics.DEFAULT_METRICS_PORT
    server = metrics.serve(port, metrics.node_registry(config.driver_postgres_url))
    try:
        stopping.wait()
    finally:
        server.shutdown()
    return 0
