"""Turn k8s/ into what `podman kube play` (4.3) runs: the training Job's pod and the server Deployment.

podman kube play skips a Job silently and does not expand $(VAR) in args, so the Job's pod template
becomes a Pod with its arguments expanded from the ConfigMap, as the kubelet would. Everything else
is the manifests' own: image, args, envFrom, env, securityContext, volumes, read-only mounts.

Changed, and why (docs/deploy.md, "Proven in CI with podman"):
- nvidia.com/gpu requests, limits and the GPU toleration are removed (CI has no GPU), as k8s/cpu does;
- CPU and memory limits are capped to what the machine has (podman refuses more CPUs than exist);
- ConfigMap values given with --set override k8s/20-config.yaml (a small, fast demo training);
- the Deployment's container ports get hostPorts (--grpc-port, --metrics-port) so the client on the
  host reaches them, and replicas is 1 (the HPA owns the count in Kubernetes);
- server.yaml has no PersistentVolumeClaims: it uses the volumes that train.yaml created.

Usage: python scripts/podman_kube.py --out DIR [--set KEY=VALUE ...] [--grpc-port N] [--metrics-port N]
writes DIR/train.yaml and DIR/server.yaml.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# One home for reading manifests and Kubernetes' $(VAR) expansion: the deployment tests' helpers.
from deploy_support import K8S, containers_of, expand, load_documents  # noqa: E402

GPU = "nvidia.com/gpu"


def _documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_documents(path.read_text())]


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return doc


def _cap_resources(spec: dict, cpus: int, memory_gib: int) -> None:
    spec.pop("tolerations", None)
    for c in spec["containers"]:
        resources = c.get("resources", {})
        for part in ("requests", "limits"):
            values = resources.get(part, {})
            values.pop(GPU, None)
            if "cpu" in values and float(values["cpu"]) > cpus:
                values["cpu"] = str(cpus)
            if (
                "memory" in values
                and values["memory"].endswith("Gi")
                and int(values["memory"][:-2]) > memory_gib
            ):
                values["memory"] = f"{memory_gib}Gi"


def _memory_gib() -> int:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, pages // 2**30 - 1)


def build(overrides: dict[str, str], grpc_port: int, metrics_port: int) -> tuple[list[dict], list[dict]]:
    """(the training documents, the server documents) for podman kube play."""
    docs = _documents()
    config_map = copy.deepcopy(_one(docs, "ConfigMap"))
    unknown = set(overrides) - set(config_map["data"])
    if unknown:
        raise SystemExit(f"--set: {sorted(unknown)} are not keys of the ConfigMap")
    config_map["data"].update(overrides)
    for doc in (config_map, *[d for d in docs if d["kind"] == "PersistentVolumeClaim"]):
        doc["metadata"].pop("namespace", None)
    claims = [copy.deepcopy(d) for d in docs if d["kind"] == "PersistentVolumeClaim"]
    cpus, memory = os.cpu_count() or 1, _memory_gib()

    job = _one(docs, "Job")
    pod_spec = copy.deepcopy(job["spec"]["template"]["spec"])
    maps = {config_map["metadata"]["name"]: config_map}
    for c, found in zip(pod_spec["containers"], containers_of("job", [job], maps), strict=True):
        expanded = []
        for arg in c.get("args", []):
            value, missing = expand(arg, found.env)
            if missing:
                raise SystemExit(f"{c['name']}: {arg!r}: $({missing[0]}) is set by no ConfigMap or env")
            expanded.append(value)
        c["args"] = expanded
    _cap_resources(pod_spec, cpus, memory)
    train_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": job["metadata"]["name"],
            "labels": job["spec"]["template"]["metadata"]["labels"],
        },
        "spec": pod_spec,
    }

    deployment = copy.deepcopy(_one(docs, "Deployment"))
    deployment["metadata"].pop("namespace", None)
    deployment["spec"]["replicas"] = 1
    server_spec = deployment["spec"]["template"]["spec"]
    _cap_resources(server_spec, cpus, memory)
    host_ports = {"grpc": grpc_port, "metrics": metrics_port}
    for c in server_spec["containers"]:
        for port in c.get("ports", []):
            if port.get("name") in host_ports:
                port["hostPort"] = host_ports[port["name"]]
    # The volumes exist once the training pod made them: kube play refuses to create them twice.
    return [config_map, *claims, train_pod], [config_map, deployment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.yaml and server.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ConfigMap override")
    parser.add_argument("--grpc-port", type=int, default=8500, help="host port for the gRPC port")
    parser.add_argument("--metrics-port", type=int, default=9090, help="host port for the metrics port")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    train, server = build(overrides, args.grpc_port, args.metrics_port)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.yaml").write_text(yaml.safe_dump_all(train, sort_keys=False))
    (args.out / "server.yaml").write_text(yaml.safe_dump_all(server, sort_keys=False))


if __name__ == "__main__":
    main()
