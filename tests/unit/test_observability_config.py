"""deploy/: the Grafana dashboard asks only for metrics that exist, and the Prometheus scrape config
reaches every process of the compose stack where it serves them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from streambridge.shared import metrics
from streambridge.shared.settings import WORKER_METRICS_PORT

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streambridge.json"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
README = ROOT / "README.md"

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
#: what prometheus-client's default collectors export in every process
PROCESS_METRICS = {"process_cpu_seconds_total", "process_resident_memory_bytes"}
METRIC_NAME = re.compile(r"\b((?:streambridge|process)_[a-z_]+)\b")


def ours() -> dict[str, MetricWrapperBase | metrics.LoopHistogram]:
    """Every metric of ``shared.metrics`` (a parent, not its label children), by family name."""
    found: dict[str, MetricWrapperBase | metrics.LoopHistogram] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase | metrics.LoopHistogram):
            for family in value.describe():
                found[family.name] = value
    return found


def series_names() -> set[str]:
    names = set(PROCESS_METRICS)
    for value in ours().values():
        for family in value.describe():
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in expressions(value)]
    if isinstance(node, list):
        return [e for value in node for e in expressions(value)]
    return []


def test_every_metric_the_dashboard_queries_exists() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = expressions(dashboard["panels"])
    assert len(exprs) >= 20
    known = series_names()
    asked = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert asked - known == set(), "the dashboard queries metrics no process exports"
    streambridge = {n for n in known if n.startswith("streambridge_")}
    families = {name for name in ours()}
    unused = {f for f in families if not any(s.startswith(f) for s in asked & streambridge)}
    assert unused == set(), "a metric without a panel"


def test_the_dashboard_is_one_grafana_dashboard_with_unique_panel_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "streambridge"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


def test_histogram_quantiles_group_by_le() -> None:
    for expr in expressions(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]):
        if "histogram_quantile" in expr:
            assert re.search(r"sum by \(le\b", expr), expr
            assert "_bucket[" in expr, expr


def test_prometheus_scrapes_the_api_both_edges_and_every_worker_replica_on_its_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"streambridge-api", "streambridge-edge", "streambridge-worker"}
    assert jobs["streambridge-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["streambridge-edge"]["static_configs"][0]["targets"] == ["edge-a:8001", "edge-b:8001"]
    (dns,) = jobs["streambridge-worker"]["dns_sd_configs"]
    assert dns["names"] == ["worker"]
    assert dns["type"] == "A"
    assert dns["port"] == WORKER_METRICS_PORT
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"


@pytest.mark.parametrize(
    ("path", "key"),
    [("datasources/prometheus.yml", "datasources"), ("dashboards/streambridge.yml", "providers")],
)
def test_grafana_provisioning_files_parse(path: str, key: str) -> None:
    config = yaml.safe_load((PROVISIONING / path).read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    assert config[key]


def test_the_datasource_the_dashboard_names_is_provisioned() -> None:
    config = yaml.safe_load((PROVISIONING / "datasources/prometheus.yml").read_text(encoding="utf-8"))
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    (variable,) = dashboard["templating"]["list"]
    assert variable["current"]["value"] == config["datasources"][0]["uid"]


def test_the_readme_lists_every_metric() -> None:
    readme = README.read_text(encoding="utf-8")
    for name, metric in ours().items():
        suffix = "_total" if metric._type == "counter" else ""
        assert f"`{name}{suffix}`" in readme, name
