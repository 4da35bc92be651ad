"""k8s/kserve/: an InferenceService with fovea as a custom predictor, checked offline.

Against KServe's own CRD schema (trimmed to the fields the manifest uses, tests/data/: unknown or
misspelt fields and wrong types fail), against what KServe reads from a custom predictor (the
container name, STORAGE_URI, PROTOCOL, the h2c port), and against fovea's real `serve` parser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra")

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "k8s" / "kserve" / "inferenceservice.yaml"
SCHEMA = ROOT / "tests" / "data" / "kserve_inferenceservice_v1beta1.schema.json"
_TYPES = {"string": str, "integer": int, "boolean": bool, "object": dict, "array": list}


def _check(value: Any, schema: dict[str, Any], path: str, problems: list[str]) -> None:
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, (int, str)):
            problems.append(f"{path}: expected an integer or a string")
        return
    kind = schema.get("type")
    if kind in _TYPES and not (
        isinstance(value, _TYPES[kind]) and not (kind == "integer" and isinstance(value, bool))
    ):
        problems.append(f"{path}: expected {kind}, got {type(value).__name__}")
        return
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                problems.append(f"{path}: missing required field {key!r}")
        for key, item in value.items():
            if "known" in schema and key not in schema["known"]:
                problems.append(f"{path}.{key}: not a field of the KServe schema")
            elif key in schema.get("properties", {}):
                _check(item, schema["properties"][key], f"{path}.{key}", problems)
            elif isinstance(schema.get("additionalProperties"), dict):
                _check(item, schema["additionalProperties"], f"{path}.{key}", problems)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]", problems)


def _manifest() -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return doc


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = doc["spec"]["predictor"]["containers"]
    return container


def test_matches_kserves_crd_schema() -> None:
    problems: list[str] = []
    _check(_manifest(), json.loads(SCHEMA.read_text()), "InferenceService", problems)
    assert not problems, "\n".join(problems)


def test_schema_check_catches_mistakes() -> None:
    """The check itself: a misspelt field, a wrong type and a field at the wrong level all fail."""
    schema = json.loads(SCHEMA.read_text())
    doc = _manifest()
    doc["spec"]["predictor"]["protocolVersion"] = (
        "v2"  # a field of predictor.model, not of a custom predictor
    )
    doc["spec"]["predictor"]["minReplicas"] = "1"
    _container(doc)["portz"] = []
    problems: list[str] = []
    _check(doc, schema, "InferenceService", problems)
    assert any("protocolVersion: not a field" in p for p in problems), problems
    assert any("minReplicas: expected integer" in p for p in problems), problems
    assert any("portz: not a field" in p for p in problems), problems


def test_is_a_custom_v2_grpc_predictor() -> None:
    doc = _manifest()
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    container = _container(doc)
    assert container["name"] == "kserve-container"
    env = {e["name"]: e for e in container["env"]}
    assert env["PROTOCOL"]["value"] == "v2"
    assert env["STORAGE_URI"]["value"].startswith(("pvc://", "gs://", "s3://", "https://"))
    label = env["FOVEA_MODEL_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert label == "metadata.labels['serving.kserve.io/inferenceservice']"
    (port,) = container["ports"]
    assert port["name"] == "h2c"
    assert container["readinessProbe"]["grpc"]["port"] == port["containerPort"]


def test_container_arguments_parse_with_the_real_cli() -> None:
    pytest.importorskip("tensorflow", reason="fovea serve's parser needs the server extra")
    from fovea.cli import build_parser
    from fovea.server import config

    container = _container(_manifest())
    args = build_parser("serve").parse_args(container["args"][1:])
    settings = config.from_args(args, environ={"FOVEA_MODEL_NAME": "fovea-demo"})
    assert settings.model_dir == "/mnt/models"  # KServe's model mount
    assert settings.model_name == "fovea-demo"
    assert settings.port == container["ports"][0]["containerPort"]
    assert settings.http_port == -1
    metrics_port = _manifest()["metadata"]["annotations"]["prometheus.kserve.io/port"]
    assert settings.metrics_port == int(metrics_port)


def test_kubectl_apply_k8s_does_not_apply_it() -> None:
    assert MANIFEST.parent != ROOT / "k8s" and not list((ROOT / "k8s").glob("*inferenceservice*"))
