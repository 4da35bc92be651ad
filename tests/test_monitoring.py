"""k8s/monitoring/: the alerting rules pass their promtool unit tests, the PrometheusRule carries the same
rules, and every metric a rule or a dashboard panel queries is one a live server exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest
import yaml
from deploy_support import ROOT

MONITORING = ROOT / "k8s" / "monitoring"
RULES = MONITORING / "fovea-alerts.rules.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULE_TESTS = ROOT / "tests" / "prometheus" / "fovea-alerts.test.yaml"

# PromQL words that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
_KEYWORDS |= {"offset", "inf", "nan", "le"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a small lexer: enough for our own queries)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\$\w+", "", text)  # Grafana variables ($__rate_interval)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if not call and word.lower() not in _KEYWORDS and not re.fullmatch(r"\d.*", word):
            names.add(word)
    return names


def test_metric_names_lexer():
    expr = 'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{method="P"}[5m]))) / on() b > 0.5'
    assert metric_names(expr) == {"a_bucket", "b"}
    assert metric_names("time() - max by (pod) (c_seconds) > 600") == {"c_seconds"}


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


# ---------------------------------------------------------------- the rules, offline


def test_promtool_rule_unit_tests_pass():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does it)")
    proc = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test_that_fires_it():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in _rules()}
    assert alerts == fired, f"alerts without a firing test: {alerts - fired}"


def test_prometheus_rule_carries_the_same_groups():
    (doc,) = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["spec"] == yaml.safe_load(RULES.read_text())


def test_monitoring_is_not_applied_with_k8s():
    """`kubectl apply -f k8s/` reads only k8s/*.yaml: the operator's CRDs are not needed there."""
    assert MONITORING.parent.name == "k8s" and MONITORING.is_dir()
    assert not list((ROOT / "k8s").glob("*PrometheusRule*"))
    for path in (ROOT / "k8s").glob("*.yaml"):
        assert "monitoring.coreos.com" not in path.read_text(), path


def test_dashboard_and_prometheus_rule_are_generated():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_monitoring", ROOT / "scripts" / "gen_monitoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run python scripts/gen_monitoring.py"
    assert PROMETHEUS_RULE.read_text() == module.render_prometheus_rule(), (
        "run python scripts/gen_monitoring.py"
    )
    titles = [panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]]
    for signal in (
        "status code",
        "latency",
        "Batch size",
        "Queue depth",
        "Shed",
        "load events",
        "RSS",
        "CPU",
    ):
        assert any(signal in t for t in titles), f"no panel for {signal}"


# ---------------------------------------------------------------- against a live server


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every sample name a live server's /metrics can carry, after a few predictions."""
    pytest.importorskip("tensorflow", reason="the live /metrics check needs the server extra")
    from _models import export_tiny
    from _serving import client, start_server, stop_server, wait_until
    from prometheus_client.parser import text_string_to_metric_families

    models = tmp_path_factory.mktemp("models")
    export_tiny(models, "tiny", 16)
    srv = start_server(models)
    try:
        wait_until(lambda: srv.manager.ready, what="ready")
        with client(srv.port) as fovea:
            for _ in range(3):
                fovea.predict(np.zeros((16, 16, 3), np.uint8), timeout=10)
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        stop_server(srv)
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
        "gauge": ("",),
    }
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


@pytest.mark.parametrize("alert", [rule["alert"] for rule in _rules()])
def test_alert_reads_only_exported_metrics(alert, exported):
    (rule,) = [r for r in _rules() if r["alert"] == alert]
    used = metric_names(rule["expr"])
    assert used, f"{alert}: no metric found in {rule['expr']!r}"
    assert used <= exported, f"{alert} reads metrics no server exports: {sorted(used - exported)}"


def test_dashboard_reads_only_exported_metrics(exported):
    queries = _dashboard_queries()
    assert queries, "the dashboard has no queries"
    for title, expr in queries:
        used = metric_names(expr)
        assert used, f"panel {title!r}: no metric found in {expr!r}"
        assert used <= exported, f"panel {title!r} reads metrics no server exports: {sorted(used - exported)}"
