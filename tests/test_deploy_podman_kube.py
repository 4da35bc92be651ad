"""scripts/podman_kube.py (what scripts/podman_e2e.sh runs) keeps the manifests' own pods.

Offline: the pods it writes for `podman kube play` differ from k8s/ only where it says they do.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import yaml
from deploy_support import ROOT, load_documents

SCRIPT = ROOT / "scripts" / "podman_kube.py"


def _module():
    spec = importlib.util.spec_from_file_location("podman_kube", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest(name: str, kind: str) -> dict:
    (doc,) = [d for d in load_documents((ROOT / "k8s" / name).read_text()) if d["kind"] == kind]
    return doc


def test_training_pod_is_the_jobs_template_with_args_expanded(tmp_path):
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--set", "FOVEA_TRAIN_EPOCHS=1"],
        check=True,
        timeout=60,
    )
    docs = list(yaml.safe_load_all((tmp_path / "train.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PersistentVolumeClaim", "PersistentVolumeClaim", "Pod"]
    pod, job = docs[-1], _manifest("30-train-job.yaml", "Job")
    template = job["spec"]["template"]["spec"]
    (container,) = pod["spec"]["containers"]
    (original,) = template["containers"]
    assert not any("$(" in arg for arg in container["args"]), container["args"]
    assert "--epochs=1" in container["args"]  # the override
    config = _manifest("20-config.yaml", "ConfigMap")["data"]
    assert f"--name={config['FOVEA_TRAIN_NAME']}" in container["args"]
    for key in ("securityContext", "envFrom", "env", "volumeMounts", "image"):
        assert container[key] == original[key], key
    for key in ("securityContext", "volumes", "restartPolicy", "automountServiceAccountToken"):
        assert pod["spec"][key] == template[key], key
    assert "nvidia.com/gpu" not in str(pod), "CI has no GPU"


def test_server_is_the_deployment_with_host_ports():
    _, server = _module().build({}, grpc_port=18500, metrics_port=19090)
    deployment, original = server[-1], _manifest("40-server-deployment.yaml", "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (source,) = original["spec"]["template"]["spec"]["containers"]
    for key in ("args", "securityContext", "envFrom", "volumeMounts", "image"):
        assert container[key] == source[key], key
    # The host reaches gRPC and /metrics; REST stays inside the pod (the stage does not call it).
    host_ports = {p["name"]: p["hostPort"] for p in container["ports"] if "hostPort" in p}
    assert host_ports == {"grpc": 18500, "metrics": 19090}
    assert (
        deployment["spec"]["template"]["spec"]["volumes"] == original["spec"]["template"]["spec"]["volumes"]
    )
