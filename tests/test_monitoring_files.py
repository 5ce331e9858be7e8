"""config/monitoring: the alert rules, Prometheus scrape example and Grafana dashboard are valid, and use
only metrics the gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.ops.metrics import GatewayMetrics

MONITORING = Path(__file__).resolve().parent.parent / "config" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "gateway.json"

# The metrics issue 5 names; every one must be exported under exactly this name.
REQUIRED_METRICS = {
    "gateway_transfers_total", "gateway_transfer_bytes_total", "gateway_dlp_findings_total",
    "gateway_transfer_duration_seconds_bucket", "gateway_inspection_duration_seconds_bucket",
    "gateway_upstream_errors_total", "gateway_active_connections", "gateway_trace_records_total",
    "gateway_trace_append_duration_seconds_bucket", "gateway_trace_tree_size",
    "gateway_trace_last_checkpoint_timestamp_seconds", "gateway_config_reloads_total",
    "gateway_config_last_reload_success_timestamp_seconds", "gateway_build_info",
    "process_cpu_seconds_total", "process_resident_memory_bytes",
}
PROMETHEUS_OWN = {"up"}  # written by Prometheus itself for every target
ALERT_NAMES = {"GatewayDown", "GatewayBlockRateSpike", "GatewayTraceCheckpointStale", "GatewayConfigReloadFailed",
               "GatewayTraceAppendTimeouts", "GatewayUpstreamErrors", "GatewayConnectionsRefused", "GatewayRevocationListStale", "GatewayNotWitnessed"}

# PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "group", "count_values",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "time", "timestamp", "vector",
    "scalar", "abs", "absent", "absent_over_time", "ceil", "floor", "round", "clamp", "clamp_min", "clamp_max",
    "histogram_quantile", "label_replace", "label_join", "sort", "sort_desc", "predict_linear",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "label_values", "inf", "nan",
}


def exported_names() -> set[str]:
    """Every sample name the gateway's registry exports (counters with _total, histograms' series)."""
    names = set()
    for family in GatewayMetrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (or Grafana variable query) reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)               # string literals
    expr = re.sub(r"label_values\((.*),\s*\w+\)", r"\1", expr)        # Grafana's label_values(METRIC, LABEL)
    expr = re.sub(r"\{[^}]*\}", "", expr)                          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                         # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\$\{?\w+\}?", "", expr)                        # Grafana variables
    expr = re.sub(r"\b\d+(\.\d+)?[smhdwy]?\b", "", expr)           # numbers and durations
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {token for token in tokens if token.lower() not in PROMQL_WORDS}


def alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    return queries


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); YAML structure checked only")
    return path


# ---------------------------------------------------------------------------------------------------


def test_metric_name_extraction():
    assert metric_names('sum by (src_zone) (rate(gateway_transfers_total{action=~"block|deny"}[5m])) / on (instance)'
                        ' time() - gateway_trace_tree_size offset 1h') == {"gateway_transfers_total",
                                                                            "gateway_trace_tree_size"}
    assert metric_names('label_values(gateway_build_info{job="gateway"}, instance)') == {"gateway_build_info"}


def test_gateway_exports_every_metric_the_issue_names():
    missing = REQUIRED_METRICS - exported_names()
    assert not missing, f"not exported: {sorted(missing)}"


def test_alert_rules_structure():
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document["groups"], list) and document["groups"]
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == ALERT_NAMES
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert 'job="gateway"' in rule["expr"], f"{rule['alert']} must select the gateway job"


def test_alerts_and_dashboard_use_only_exported_metrics():
    exported = exported_names() | PROMETHEUS_OWN
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        used[f"alert {rule['alert']}"] = metric_names(rule["expr"])
    dashboard = json.loads(DASHBOARD.read_text())
    for query in dashboard_queries(dashboard):
        used[f"dashboard: {query}"] = metric_names(query)
    unknown = {where: names - exported for where, names in used.items() if names - exported}
    assert not unknown, f"metrics the gateway does not export: {unknown}"
    every_used = set().union(*used.values())
    # The dashboard shows each family the issue names (the process metrics aside).
    assert {name for name in REQUIRED_METRICS if name.startswith("gateway_")} <= every_used


def test_dashboard_is_provisioning_ready():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "boundary-gateway" and dashboard["title"]
    assert "id" not in dashboard and "__inputs" not in dashboard  # provisioned as is, not imported
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert any(panel.get("repeat") == "src_zone" for panel in dashboard["panels"])  # one row per boundary source
    assert {"Overview", "DLP findings", "Trace log"} <= set(rows)

    provider = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "gateway.yaml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    datasource = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "datasources" / "gateway-prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"


def test_scrape_example_targets_the_gateway_job():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gateway"]["metrics_path"] == "/metrics"
    assert config["rule_files"] == ["alerts.yml"]


def test_promtool_checks_rules_and_config():
    tool = promtool()
    for argv in ([tool, "check", "rules", "alerts.yml"], [tool, "check", "config", "prometheus.yml"],
                 [tool, "test", "rules", "alerts_test.yml"]):
        result = subprocess.run(argv, cwd=MONITORING, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(argv[1:])}:\n{result.stdout}{result.stderr}"
