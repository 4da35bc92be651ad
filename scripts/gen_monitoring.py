"""Write k8s/monitoring/grafana-dashboard.json (the fovea dashboard: import it in Grafana, or load it with
a dashboard ConfigMap sidecar) and k8s/monitoring/prometheusrule.yaml (fovea-alerts.rules.yaml's groups
as a Prometheus Operator PrometheusRule). Edit the panels here and the rules in fovea-alerts.rules.yaml,
then `python scripts/gen_monitoring.py`; tests/test_monitoring.py checks both files are current and
that every query reads exported metrics."""

from __future__ import annotations

import json
from pathlib import Path

MONITORING = Path(__file__).resolve().parents[1] / "k8s" / "monitoring"
OUT = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "fovea-alerts.rules.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
SEL = 'job=~"$job"'
# The inference calls of every protocol: fovea.v1 and TF Serving Predict, TF Serving Classify, v2 ModelInfer.
INFER = 'method=~"Predict|Classify|ModelInfer"'
RATE = "$__rate_interval"


def _rate(metric: str, extra: str = "", window: str = RATE, fn: str = "rate") -> str:
    """`fn` (rate or increase) of a counter of the selected jobs, over the dashboard's interval."""
    return f"{fn}({metric}{{{SEL}{extra}}}[{window}])"


def _agg(op: str, inner: str, by: str = "") -> str:
    return f"{op} by ({by}) ({inner})" if by else f"{op}({inner})"


def _quantile(q: float, metric: str, extra: str = "", window: str = RATE) -> str:
    return f"histogram_quantile({q}, {_agg('sum', _rate(metric + '_bucket', extra, window), 'le')})"


def _mean(metric: str) -> str:
    """Mean of a histogram's observations: rate of its sum over rate of its count."""
    return f"{_agg('sum', _rate(metric + '_sum'))} / {_agg('sum', _rate(metric + '_count'))}"


def _t(expr: str, legend: str, **extra: str) -> dict:
    return {"expr": expr, "legendFormat": legend, **extra}


def _quantiles(metric: str, extra: str = "") -> list[dict]:
    return [_t(_quantile(q, metric, extra), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)]


# (title, unit, description, targets); each target: expr and legend.
PANELS: list[tuple[str, str, str, list[dict]]] = [
    ("Requests by status code", "reqps", "RPCs finished per second, by gRPC status code.", [
        _t(_agg("sum", _rate("fovea_requests_total"), "code"), "{{code}}"),
    ]),
    ("Inference latency", "s", "Handling time of inference calls (Predict, Classify, ModelInfer). Objective: p99 under 500 ms.",
        _quantiles("fovea_request_duration_seconds", f",{INFER}")),
    ("Where the time goes (p99)", "s", "Decode and resize, waiting in the batch queue, one model call.", [
        _t(_quantile(0.99, "fovea_preprocess_duration_seconds"), "decode (p99)"),
        _t(_quantile(0.99, "fovea_queue_duration_seconds"), "queue wait (p99)"),
        _t(_quantile(0.99, "fovea_compute_duration_seconds"), "compute (p99)"),
    ]),
    ("Batch size distribution", "short", "Model calls per second by batch size (real images; bucket upper bounds).", [
        _t(_agg("sum", _rate("fovea_batch_size_images_bucket"), "le"), "{{le}}", format="heatmap"),
    ]),
    ("Mean batch size", "short", "Images per model call, and padding images added per call.", [
        _t(_mean("fovea_batch_size_images"), "images per call"),
        _t(_mean("fovea_batch_padding_images"), "padding per call"),
    ]),
    ("Queue depth", "short", "Requests waiting for a batch, per pod and model; shedding starts at the capacity.", [
        _t(_agg("sum", f"fovea_queue_depth_requests{{{SEL}}}", "pod, model"), "{{pod}} {{model}}"),
        _t(_agg("max", f"fovea_queue_capacity_requests{{{SEL}}}"), "capacity"),
    ]),
    ("Shed, expired, cancelled", "reqps", "Requests dropped before compute: queue full, deadline passed, caller left.", [
        _t(_agg("sum", _rate("fovea_shed_requests_total")), "shed (queue full)"),
        _t(_agg("sum", _rate("fovea_expired_requests_total")), "expired (deadline)"),
        _t(_agg("sum", _rate("fovea_cancelled_requests_total")), "cancelled"),
    ]),
    ("Model load events", "short", "Versions loaded and failed per interval; versions waiting to serve.", [
        _t(_agg("sum", _rate("fovea_model_loads_total", fn="increase"), "model"), "loaded {{model}}"),
        _t(_agg("sum", _rate("fovea_model_load_failures_total", fn="increase"), "model"), "failed {{model}}"),
        _t(_agg("max", f"fovea_model_versions_pending{{{SEL}}}", "model"), "pending {{model}}"),
    ]),
    ("Serving versions and ready pods", "short", "Pods SERVING, and pods serving each model version.", [
        _t(_agg("sum", f"fovea_ready{{{SEL}}}"), "ready pods"),
        _t(_agg("sum", f"fovea_model_version_info{{{SEL}}}", "model, version"), "{{model}} v{{version}}"),
    ]),
    ("Model load and warm-up time (p90)", "s", "SavedModel load and warm-up durations.", [
        _t(_quantile(0.9, "fovea_model_load_duration_seconds", window="1h"), "load"),
        _t(_quantile(0.9, "fovea_model_warmup_duration_seconds", window="1h"), "warm-up"),
    ]),
    ("Predictions per version", "reqps", "Predictions per second by version and label (rollout.json): the canary's share.", [
        _t(_agg("sum", _rate("fovea_version_predictions_total"), "model, version, label"), "{{model}} v{{version}} {{label}}"),
    ]),
    ("Error ratio per version", "percentunit", "Server-side failures per version: a canary beside stable.", [
        _t(_agg("sum", _rate("fovea_version_predictions_total", ',code=~"INTERNAL|UNKNOWN|UNAVAILABLE|DATA_LOSS"'), "model, version")
           + " / " + _agg("sum", _rate("fovea_version_predictions_total"), "model, version"), "{{model}} v{{version}}"),
    ]),
    ("Latency per version (p99)", "s", "Version resolution to result, per version: compare the canary with stable.", [
        _t(f"histogram_quantile(0.99, {_agg('sum', _rate('fovea_version_predict_duration_seconds_bucket'), 'le, model, version')})", "{{model}} v{{version}}"),
    ]),
    ("Shadow agreement", "percentunit", "Share of mirrored images whose top-1 class equals the live answer, per shadow version.", [
        _t(_agg("sum", _rate("fovea_shadow_top1_equal_total"), "model, version")
           + " / " + _agg("sum", _rate("fovea_shadow_images_total"), "model, version"), "{{model}} v{{version}}"),
    ]),
    ("Shadow requests", "reqps", "Sampled requests computed on the shadow, and dropped (live work queued, unloaded, ...).", [
        _t(_agg("sum", _rate("fovea_shadow_requests_total"), "model, version, outcome"), "{{model}} v{{version}} {{outcome}}"),
    ]),
    ("Memory (RSS)", "bytes", "Resident memory per pod (compare with the container's memory limit).", [
        _t(f"process_resident_memory_bytes{{{SEL}}}", "{{pod}}"),
    ]),
    ("CPU", "percentunit", "CPU cores used per pod.", [
        _t(_rate("process_cpu_seconds_total"), "{{pod}}"),
    ]),
]  # fmt: skip


def dashboard() -> dict:
    panels = []
    for i, (title, unit, description, targets) in enumerate(PANELS):
        heatmap = any(t.get("format") == "heatmap" for t in targets)
        panels.append({
            "id": i + 1,
            "type": "heatmap" if heatmap else "timeseries",
            "title": title,
            "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), **t} for j, t in enumerate(targets)],
        })  # fmt: skip
    return {
        "title": "fovea",
        "uid": "fovea-server",
        "description": "fovea servers: traffic, latency, batching, queue, model versions, resources.",
        "tags": ["fovea"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
                {
                    "name": "job",
                    "type": "query",
                    "label": "job",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": "label_values(fovea_ready, job)", "refId": "job"},
                    "includeAll": True,
                    "multi": True,
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


_RULE_HEADER = """\
# Generated by scripts/gen_monitoring.py from fovea-alerts.rules.yaml (edit that file, not this one):
# its alerting rules for the Prometheus Operator (kube-prometheus-stack):
#   kubectl apply -f k8s/monitoring/prometheusrule.yaml
# Not in k8s/ itself, so `kubectl apply -f k8s/` (not recursive) works on clusters without the
# operator's CRDs. Your Prometheus's ruleSelector may need a label here (e.g. release: <helm release>).
"""


def render_prometheus_rule() -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "fovea", "namespace": "fovea", "labels": {"app.kubernetes.io/name": "fovea"}},
        "spec": yaml.safe_load(RULES.read_text()),
    }
    return _RULE_HEADER + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=110)


if __name__ == "__main__":
    OUT.write_text(render())
    PROMETHEUS_RULE.write_text(render_prometheus_rule())
