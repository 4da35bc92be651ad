"""The shipped Kubernetes settings fit the pod's memory limit by the worst-case formula (docs/memory.md)."""

from __future__ import annotations

import argparse
import re

import pytest
from deploy_support import CPU_OVERLAY, K8S, load_documents
from fovea.server import config, memory

# ResNet50 at 224 px, warm (batch 32 warmed up), on the CPU: the host RSS of the idle server. The
# benchmark measured 1.18 GB at 96 px; activations grow with the square of the input size, so this
# allows for 224 px with margin. A second loaded copy during a reload adds the model once more.
WARM_BYTES = 3 * 2**30
MODEL_BYTES = 512 * 2**20
HEADROOM = 0.9  # the formula's total must stay under 90% of the limit


def quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units[unit]


def shipped_settings() -> config.Settings:
    (configmap,) = [
        d for d in load_documents((K8S / "20-config.yaml").read_text()) if d["kind"] == "ConfigMap"
    ]
    environ = {k: str(v) for k, v in configmap["data"].items() if not k.startswith("FOVEA_TRAIN_")}
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_args(parser.parse_args([]), environ=environ)


def server_limits() -> dict:
    docs = load_documents((K8S / "40-server-deployment.yaml").read_text())
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return container["resources"]["limits"]


def cpu_overlay_cpu_limit() -> str:
    text = (CPU_OVERLAY / "kustomization.yaml").read_text()
    match = re.search(
        r"path: /spec/template/spec/containers/0/resources/limits/cpu\s+value: \"?([0-9.]+)", text
    )
    assert match, "the CPU overlay no longer sets the server's CPU limit where this test looks"
    return match.group(1)


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_shipped_settings_fit_the_pod_limit(variant: str) -> None:
    settings = shipped_settings()
    limits = server_limits()
    cpus = quantity(limits["cpu"] if variant == "gpu" else cpu_overlay_cpu_limit())
    # --preprocess-threads 0 would mean the cgroup quota: the pod's CPU limit.
    threads = settings.preprocess_threads or max(1, int(-(-cpus // 1)))
    budget = memory.budget(settings, WARM_BYTES, MODEL_BYTES, input_size=(224, 224), decode_threads=threads)
    limit = quantity(limits["memory"])
    print(f"{variant}: " + "; ".join(budget.lines()) + f"; limit {limit / 2**20:,.0f} MiB")
    assert budget.total <= HEADROOM * limit


def test_the_formula_grows_with_each_bound() -> None:
    base = config.Settings()
    total = memory.worst_case_bytes(base, decode_threads=2)
    for change in ({"max_concurrent_rpcs": 128}, {"max_message_mb": 128}, {"max_pixels": 80_000_000},
                   {"max_inflight_images": 4096}):  # fmt: skip
        bigger = config.Settings(**{**{}, **change})
        assert memory.worst_case_bytes(bigger, decode_threads=2) > total, change


def test_the_http_term_counts_the_parse_process() -> None:
    """The JSON parse of a large body runs in its own process: its interpreter, the JSON it is sent,
    its parse and its reply in the server are all in the http term (docs/memory.md)."""
    settings = config.Settings(max_message_mb=64, max_concurrent_rpcs=8)
    max_json = 64 * 2**20 // memory.JSON_SHARE
    bodies = memory.rest_bodies(8) * 64 * 2**20 + 64 * 2**20
    http = memory.budget(settings, 0, 0, decode_threads=1).http
    parse = (memory.JSON_PARSE_FACTOR + 1 + 2 * memory.REPLY_FACTOR) * max_json + memory.PARSE_PROCESS_BYTES
    assert http == bodies + parse + memory.JSON_PARSE_FACTOR * memory.SMALL_JSON
