"""Monitoring as deployed: the Prometheus config and alerting rules pass promtool (the
rules' unit tests included), the rules and the Grafana dashboard name only metrics the
services export, and live scrapes of a real cloud and agent pass `promtool check metrics`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import tandem.metrics  # noqa: F401  (defines every metric in the default registry)
from tests.support.cluster import Cluster  # the `cluster` fixture is in conftest.py

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RULES = ROOT / "deploy/prometheus/rules/tandem.rules.yml"
RULE_TESTS = ROOT / "deploy/prometheus/rules/tandem.rules.test.yml"
DASHBOARD = ROOT / "deploy/grafana/tandem.json"
PANELS = {"Rounds and accuracy", "Bytes per round", "Inference latency by placement",
          "Placement decisions per agent", "Edge fallbacks", "Inference queue depth"}
ALERTS = {"TandemCoordinatorDown", "TandemNoAgentConnected", "TandemRoundsFailingQuorum",
          "TandemUpdatesRejectedSpike", "TandemInferenceLatencyHigh", "TandemEdgeFallbackRateHigh",
          "TandemStateVolumeLow", "TandemStateVolumeFillingUp", "TandemRolloutRolledBack"}
# Sample names per family type, as prometheus_client exposes them.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (Debian's prometheus package has it)"
)


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=120)


def exported() -> set[str]:
    """Every sample name the services can expose, and Prometheus's own `up`."""
    names = {"up"}
    for family in REGISTRY.collect():
        if family.name.startswith("tandem_"):
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def metric_names(promql: str) -> set[str]:
    """Metric names in a PromQL expression (string literals such as label values left out)."""
    code = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)
    return set(re.findall(r"\b(?:tandem_\w+|up)\b", code))


def alerting_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def dashboard_queries() -> dict[str, str]:
    """Every PromQL in the dashboard, keyed by where it is."""
    board = dashboard()
    queries = {f"{p['title']}/{t['refId']}": t["expr"] for p in board["panels"] for t in p["targets"]}
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            queries[f"${var['name']}"] = var["query"]["query"]
    return queries


@pytest.mark.process
@needs_promtool
def test_config_and_rules_pass_promtool() -> None:
    config = promtool("check", "config", str(CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "tandem.rules.yml" in config.stdout, "prometheus.yml does not load the rules"
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    unit = promtool("test", "rules", str(RULE_TESTS))
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_rules_alert_on_every_failure_we_watch() -> None:
    rules = alerting_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["for"] and {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
    # promtool test rules passing proves little unless it exercises every alert.
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == ALERTS


def test_dashboard_has_the_panels() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert PANELS <= {p["title"] for p in board["panels"]}
    for panel in board["panels"]:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.process
@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule promtool parses."""
    fill = {"$__rate_interval": "1m", "$__range": "1h", "$agent": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_queries().values()):
        expr = re.sub(r"^label_values\((.*), *\w+\)$", r"\1", expr)  # Grafana's, not PromQL
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_metric_names_are_read_from_promql() -> None:
    expr = 'sum by (kind) (rate(tandem_x_total{job="tandem-cloud", direction="up"}[5m])) / up'
    assert metric_names(expr) == {"tandem_x_total", "up"}


def test_only_exported_metrics_are_named() -> None:
    known = exported()
    assert {"tandem_coordinator_rounds_total", "tandem_inference_request_duration_seconds_bucket"} <= known
    queries = dashboard_queries()
    for rule in alerting_rules():
        queries[rule["alert"]] = rule["expr"]
        for name, text in rule["annotations"].items():
            queries[f"{rule['alert']}/{name}"] = text
    named = {where: metric_names(q) for where, q in queries.items()}
    unknown = {where: sorted(names - known) for where, names in named.items() if names - known}
    assert not unknown, f"not exported by services/tandem/metrics.py: {unknown}"
    assert all(named[rule["alert"]] for rule in alerting_rules())
    assert all(named[where] for where in dashboard_queries())


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


@pytest.mark.process
@needs_promtool
async def test_live_metrics_pass_promtool_lint(cluster: Cluster) -> None:
    cluster.start_cloud()
    [agent] = cluster.start_agents(1)
    await cluster.wait_connected(1)
    # Labelled families show samples only once used: wait_connected's Admin calls made
    # some in the cloud (a labelled histogram); the agent's show its live state.
    live = {"cloud": (cluster.ports["metrics_port"], "tandem_rpc_server_handling_seconds_bucket{"),
            agent: (cluster.agent_metrics[agent], "tandem_edge_connected 1.0")}
    for who, (port, sample) in live.items():
        exposition = scrape(port)
        assert sample in exposition, who
        lint = promtool("check", "metrics", stdin=exposition)
        assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), who
