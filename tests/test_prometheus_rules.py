"""deploy/: the Prometheus alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`); the rules and the Grafana dashboard use only metric names that
fleet_server and edge_agent export."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "edgefleet-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "edgefleet-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "edgefleet-dashboard.json"
EXPORTING_PACKAGES = ("fleet_server", "edge_agent")
# Series Prometheus itself adds to every scrape, not exported by edgefleet.
PROMETHEUS_OWN = {"up"}
# What a metric family of each type exposes (prometheus_client's text format).
SUFFIXES = {
    "CounterMetricFamily": ("_total",),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count"),
    "SummaryMetricFamily": ("_sum", "_count", ""),
    "InfoMetricFamily": ("_info",),
}
# The agent writes its own text format (no prometheus_client on a device): its kinds, as families.
AGENT_KINDS = {"counter": "CounterMetricFamily", "histogram": "HistogramMetricFamily", "gauge": "GaugeMetricFamily"}
METRIC_NAME = re.compile(r"\bedgefleet_[a-z0-9_]+\b")


def promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(path).is_file():
        pytest.fail("promtool is missing: install Debian's prometheus package (make system-deps does)")
    return path


def exported_metric_names(packages: tuple[str, ...] = EXPORTING_PACKAGES) -> set[str]:
    """Every series name the code can expose: the first argument of each `*MetricFamily(...)` call
    (and of the agent's `Family(name, kind, ...)`) in the packages, with the suffixes its type adds."""
    names: set[str] = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                first = node.args[0]
                if func == "Family" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    # The agent's own text writer (edge_agent/metrics.py): Family(name, kind, ...).
                    func = AGENT_KINDS.get(str(node.args[1].value), "GaugeMetricFamily")
                if not func.endswith("MetricFamily") or not isinstance(first, ast.Constant):
                    continue
                base = str(first.value).removesuffix("_total") if func == "CounterMetricFamily" else str(first.value)
                names.update(base + suffix for suffix in SUFFIXES.get(func, ("",)))
    return names


def dashboard_queries(dashboard: dict | None = None) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    dashboard = dashboard if dashboard is not None else json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(query)
    return exprs


def rule_expressions() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def unknown_metrics(exprs: list[str], exported: set[str]) -> set[str]:
    return {name for e in exprs for name in METRIC_NAME.findall(e)} - exported - PROMETHEUS_OWN


def test_rules_pass_promtool_check():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in out.stdout


def test_rules_unit_tests_pass():
    out = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    # Every alert has a unit test where it fires.
    tested = yaml.safe_load(RULE_TESTS.read_text())
    fired = {case["alertname"] for t in tested["tests"] for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert fired == set(rule_expressions())


def test_the_required_alerts_exist():
    rules = rule_expressions()
    wanted = {
        "device offline share": "edgefleet_devices",
        "ingest lag": "edgefleet_ingest_lag_seconds",
        "rejects": "edgefleet_ingest_messages_total",
        "drift alert open": "edgefleet_open_alerts",
        "rollout paused": "edgefleet_rollouts",
        "agent memory near its cap": "edgefleet_agent_memory_limit_bytes",
        "certificate expiry": "edgefleet_tls_certificate_expiry_timestamp_seconds",
    }
    for what, metric in wanted.items():
        assert any(metric in expr for expr in rules.values()), what


def test_rules_and_dashboard_use_only_exported_metrics():
    exported = exported_metric_names()
    # The scan finds the families of both ends, with their type's suffixes.
    assert {"edgefleet_devices", "edgefleet_ingest_rejects_total", "edgefleet_rollouts",
            "edgefleet_predict_latency_seconds_bucket", "edgefleet_agent_memory_limit_bytes"} <= exported
    assert "edgefleet_predictions" not in exported  # a counter is only exposed with _total
    queries = dashboard_queries()
    assert len(queries) >= 20
    assert unknown_metrics(queries, exported) == set()
    assert unknown_metrics(list(rule_expressions().values()), exported) == set()
    # The check itself flags a name the code does not export.
    assert unknown_metrics(["rate(edgefleet_predictions[5m])", "edgefleet_made_up"], exported) == {
        "edgefleet_predictions", "edgefleet_made_up"}


def test_dashboard_is_a_grafana_dashboard_over_a_prometheus_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "edgefleet" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    # Both ends are on it: the server's and the agents' metrics.
    names = {n for q in dashboard_queries(dashboard) for n in METRIC_NAME.findall(q)}
    assert {"edgefleet_devices", "edgefleet_rollouts", "edgefleet_ingest_lag_seconds"} <= names
    assert {"edgefleet_predictions_total", "edgefleet_agent_resident_memory_bytes", "edgefleet_mqtt_connected"} <= names
