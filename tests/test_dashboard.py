"""The Grafana dashboard and the compose profile `observability` against what the code exports.

There is no Docker engine here to start Prometheus and Grafana: instead every
query of the dashboard is checked against the metrics pyswpt.metrics defines
(names with their suffixes, and labels), and the compose profile against the
files it mounts and the ports and uids they name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from pyswpt import metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "pyswpt.json"
SELECTOR = re.compile(r"\b(pyswpt_\w+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def exported() -> dict[str, set[str]]:
    """Every sample name the node serves, with the labels it carries."""
    samples: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in SAMPLE_SUFFIXES[metric._type]:
                labels = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
                samples[metric._name + suffix] = labels
    for family in metrics.DatabaseCollector.empty_families():
        samples[family.name] = set(family._labelnames)
    return samples


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_queries_only_metrics_and_labels_the_node_exports():
    samples = exported()
    checked = set()
    for expr in expressions():
        used = SELECTOR.findall(expr)
        assert used, expr
        for name, matchers in used:
            assert name in samples, f"{name} is not exported ({expr})"
            assert set(MATCHER.findall(matchers)) <= samples[name], expr
            checked.add(name)
        labels_of_expr = set().union(*(samples[name] for name, _ in used))
        for grouping in GROUPING.findall(expr):
            assert {label.strip() for label in grouping.split(",")} <= labels_of_expr, expr
    # The panels the issue asks for: transfers, latency, backlogs, errors, restarts.
    for name in (
        "pyswpt_messages_consumed_total",
        "pyswpt_consume_to_commit_seconds_bucket",
        "pyswpt_commit_to_publish_seconds_bucket",
        "pyswpt_outbox_backlog_rows",
        "pyswpt_work_queue_requests",
        "pyswpt_parked_messages",
        "pyswpt_driver_restarts_total",
    ):
        assert name in checked, name


def test_the_check_of_the_dashboard_catches_a_misspelt_metric():
    samples = exported()
    assert "pyswpt_messages_consumed_total" in samples
    assert "pyswpt_messages_consumed" not in samples
    assert "outcome" in samples["pyswpt_messages_consumed_total"]


def test_the_observability_profile_scrapes_the_node_and_provisions_the_dashboard():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for volume in services[name]["volumes"]:
            host_path = volume.split(":")[0]
            assert (ROOT / host_path).exists(), volume
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"accounts:{metrics.DEFAULT_METRICS_PORT}"]
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel} == {source["uid"]}
    [provider] = yaml.safe_load((provisioning / "dashboards" / "pyswpt.yml").read_text())["providers"]
    mounted = [v for v in services["grafana"]["volumes"] if v.startswith("./deploy/grafana/pyswpt.json:")]
    assert [v.split(":")[1].rsplit("/", 1)[0] for v in mounted] == [provider["options"]["path"]]
    assert "/accounts/readyz" in " ".join(services["accounts"]["healthcheck"]["test"])
