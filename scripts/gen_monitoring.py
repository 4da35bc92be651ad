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


def _quantiles(metric: str, extra: str = "") -> list[dict]:
    return [
        {
            "expr": f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{SEL}{extra}}}[{RATE}])))",
            "legendFormat": f"p{round(q * 100)}",
        }
        for q in (0.5, 0.9, 0.99)
    ]


# (title, unit, description, targets); each target: expr and legend.
PANELS: list[tuple[str, str, str, list[dict]]] = [
    ("Requests by status code", "reqps", "RPCs finished per second, by gRPC status code.", [
        {"expr": f"sum by (code) (rate(fovea_requests_total{{{SEL}}}[{RATE}]))", "legendFormat": "{{code}}"},
    ]),
    ("Inference latency", "s", "Handling time of inference calls (Predict, Classify, ModelInfer). Objective: p99 under 500 ms.",
        _quantiles("fovea_request_duration_seconds", f",{INFER}")),
    ("Where the time goes (p99)", "s", "Decode and resize, waiting in the batch queue, one model call.", [
        {"expr": f"histogram_quantile(0.99, sum by (le) (rate(fovea_preprocess_duration_seconds_bucket{{{SEL}}}[{RATE}])))", "legendFormat": "decode (p99)"},
        {"expr": f"histogram_quantile(0.99, sum by (le) (rate(fovea_queue_duration_seconds_bucket{{{SEL}}}[{RATE}])))", "legendFormat": "queue wait (p99)"},
        {"expr": f"histogram_quantile(0.99, sum by (le) (rate(fovea_compute_duration_seconds_bucket{{{SEL}}}[{RATE}])))", "legendFormat": "compute (p99)"},
    ]),
    ("Batch size distribution", "short", "Model calls per second by batch size (real images; bucket upper bounds).", [
        {"expr": f"sum by (le) (rate(fovea_batch_size_images_bucket{{{SEL}}}[{RATE}]))", "legendFormat": "{{le}}", "format": "heatmap"},
    ]),
    ("Mean batch size", "short", "Images per model call, and padding images added per call.", [
        {"expr": f"sum(rate(fovea_batch_size_images_sum{{{SEL}}}[{RATE}])) / sum(rate(fovea_batch_size_images_count{{{SEL}}}[{RATE}]))", "legendFormat": "images per call"},
        {"expr": f"sum(rate(fovea_batch_padding_images_sum{{{SEL}}}[{RATE}])) / sum(rate(fovea_batch_padding_images_count{{{SEL}}}[{RATE}]))", "legendFormat": "padding per call"},
    ]),
    ("Queue depth", "short", "Requests waiting for a batch, per pod and model; shedding starts at the capacity.", [
        {"expr": f"sum by (pod, model) (fovea_queue_depth_requests{{{SEL}}})", "legendFormat": "{{pod}} {{model}}"},
        {"expr": f"max(fovea_queue_capacity_requests{{{SEL}}})", "legendFormat": "capacity"},
    ]),
    ("Shed, expired, cancelled", "reqps", "Requests dropped before compute: queue full, deadline passed, caller left.", [
        {"expr": f"sum(rate(fovea_shed_requests_total{{{SEL}}}[{RATE}]))", "legendFormat": "shed (queue full)"},
        {"expr": f"sum(rate(fovea_expired_requests_total{{{SEL}}}[{RATE}]))", "legendFormat": "expired (deadline)"},
        {"expr": f"sum(rate(fovea_cancelled_requests_total{{{SEL}}}[{RATE}]))", "legendFormat": "cancelled"},
    ]),
    ("Model load events", "short", "Versions loaded and failed per interval; versions waiting to serve.", [
        {"expr": f"sum by (model) (increase(fovea_model_loads_total{{{SEL}}}[{RATE}]))", "legendFormat": "loaded {{model}}"},
        {"expr": f"sum by (model) (increase(fovea_model_load_failures_total{{{SEL}}}[{RATE}]))", "legendFormat": "failed {{model}}"},
        {"expr": f"max by (model) (fovea_model_versions_pending{{{SEL}}})", "legendFormat": "pending {{model}}"},
    ]),
    ("Serving versions and ready pods", "short", "Pods SERVING, and pods serving each model version.", [
        {"expr": f"sum(fovea_ready{{{SEL}}})", "legendFormat": "ready pods"},
        {"expr": f"sum by (model, version) (fovea_model_version_info{{{SEL}}})", "legendFormat": "{{model}} v{{version}}"},
    ]),
    ("Model load and warm-up time (p90)", "s", "SavedModel load and warm-up durations.", [
        {"expr": f"histogram_quantile(0.9, sum by (le) (rate(fovea_model_load_duration_seconds_bucket{{{SEL}}}[1h])))", "legendFormat": "load"},
        {"expr": f"histogram_quantile(0.9, sum by (le) (rate(fovea_model_warmup_duration_seconds_bucket{{{SEL}}}[1h])))", "legendFormat": "warm-up"},
    ]),
    ("Memory (RSS)", "bytes", "Resident memory per pod (compare with the container's memory limit).", [
        {"expr": f"process_resident_memory_bytes{{{SEL}}}", "legendFormat": "{{pod}}"},
    ]),
    ("CPU", "percentunit", "CPU cores used per pod.", [
        {"expr": f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "legendFormat": "{{pod}}"},
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
