"""Helpers for the deployment tests: find the tools, load the manifests, expand container arguments."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CPU_OVERLAY = K8S / "cpu"
MULTIWORKER = K8S / "multiworker"
KUBERNETES_VERSION = "1.30.0"
# Raw manifests: `kubectl apply -f k8s/` and `kubectl apply -f k8s/multiworker/`.
RAW_MANIFESTS = sorted(K8S.glob("*.yaml")) + sorted(MULTIWORKER.glob("*.yaml"))


def find_tool(name: str) -> str | None:
    """A command on PATH, else beside this interpreter (the venv's bin/ need not be on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


def dev_tool(name: str) -> str:
    """A linter that the dev extra installs: missing means a broken dev install, so the test fails."""
    import pytest

    found = find_tool(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it is a dev dependency (pip install -e '.[dev]')")
    return found


def load_documents(text: str) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_cpu_overlay() -> tuple[str | None, str]:
    """(the rendered CPU variant, or None, and why not)."""
    kubectl = find_tool("kubectl")
    if kubectl is None:
        return None, "kubectl is not installed (it renders k8s/cpu/ with its built-in kustomize)"
    proc = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(CPU_OVERLAY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/cpu failed:\n{proc.stderr}")
    return proc.stdout, ""


@dataclass
class Container:
    """One container of one workload, with what the kubelet would give it."""

    source: str  # "k8s/40-server-deployment.yaml" or "k8s/cpu (rendered)"
    kind: str
    name: str
    container: dict
    pod_spec: dict
    workload: dict
    env: dict[str, str] = field(default_factory=dict)  # envFrom ConfigMaps, then env values

    @property
    def id(self) -> str:
        return f"{self.source}:{self.kind}/{self.name}/{self.container['name']}"


def pod_spec_of(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc["spec"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def containers_of(source: str, docs: list[dict], config_maps: dict[str, dict]) -> list[Container]:
    found = []
    for doc in docs:
        spec = pod_spec_of(doc)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            env: dict[str, str] = {}
            for ref in c.get("envFrom", []):
                cm_name = ref.get("configMapRef", {}).get("name")
                if cm_name is None or cm_name not in config_maps:
                    raise AssertionError(f"{source}: {c['name']} reads a ConfigMap not in k8s/: {ref}")
                prefix = ref.get("prefix", "")
                env.update({prefix + k: str(v) for k, v in config_maps[cm_name].get("data", {}).items()})
            for var in c.get("env", []):
                if "value" in var:
                    env[var["name"]] = str(var["value"])
            found.append(Container(source, doc["kind"], doc["metadata"]["name"], c, spec, doc, env))
    return found


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """Kubernetes' $(VAR) expansion of command/args; returns the result and the unresolved names.

    The kubelet leaves an undefined $(VAR) as it is, which a CLI would then reject at run time.
    """
    missing: list[str] = []

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        if name in env:
            return env[name]
        missing.append(name)
        return match.group(0)

    return _VAR_REF.sub(substitute, value), missing


EXEC_FOVEA = 'exec fovea "$@"'


def fovea_argv(c: Container) -> list[str]:
    """The argv that `fovea` receives in this container (the image's entry point is `fovea`)."""
    command = c.container.get("command")
    args = list(c.container.get("args", []))
    if not command:
        return args
    if Path(command[0]).name == "fovea":
        return list(command[1:]) + args
    # A shell prelude (e.g. building TF_CONFIG) that hands its arguments to fovea unchanged.
    is_shell = Path(command[0]).name in ("sh", "bash") and command[1:2] == ["-c"] and len(command) >= 3
    if is_shell and command[2].rstrip().splitlines()[-1].strip() == EXEC_FOVEA:
        return args
    raise AssertionError(f"{c.id}: runs {command!r}, not fovea (or a shell ending in `{EXEC_FOVEA}`)")
