"""k8s/: valid for Kubernetes 1.30, checkov-clean, and every container's arguments parse with the real CLI.

Also the promises the manifests make that a schema cannot see: the Job needs a GPU, resumes from its
backup and publishes to the volume the server reads; the server drains within its grace period, is
probed over gRPC health, runs locked down; the CPU variant has no GPU; the multi-worker TF_CONFIG.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml  # a dev dependency: missing fails the module, it does not skip it
from deploy_support import (
    CPU_OVERLAY,
    K8S,
    KUBERNETES_VERSION,
    MULTIWORKER,
    RAW_MANIFESTS,
    ROOT,
    Container,
    containers_of,
    dev_tool,
    expand,
    find_tool,
    fovea_argv,
    load_documents,
    render_cpu_overlay,
)

CPU_SOURCE = "k8s/cpu (rendered)"
GPU = "nvidia.com/gpu"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@cache
def _sources() -> dict[str, list[dict]]:
    """Every set of manifests a user applies: each raw file, and the rendered CPU variant."""
    sources = {_rel(p): load_documents(p.read_text()) for p in RAW_MANIFESTS}
    rendered, _ = render_cpu_overlay()
    if rendered is not None:
        sources[CPU_SOURCE] = load_documents(rendered)
    return sources


def _base_docs() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in _sources()[_rel(path)]]


def _config_maps(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}


def _all_containers() -> list[Container]:
    base_maps = _config_maps(_base_docs())
    found = []
    for source, docs in _sources().items():
        maps = _config_maps(docs) if source == CPU_SOURCE else base_maps
        found += containers_of(source, docs, maps)
    return found


def _one(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _container(workload: dict, name: str) -> dict:
    spec = workload["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def _cpu_rendered_or_skip() -> list[dict]:
    if CPU_SOURCE not in _sources():
        _, why = render_cpu_overlay()
        pytest.skip(f"the CPU variant is not checked: {why}")
    return _sources()[CPU_SOURCE]


# ---------------------------------------------------------------- layout


def test_k8s_applies_in_name_order_without_a_kustomization():
    names = sorted(p.name for p in K8S.iterdir() if p.is_file())
    for kustomization in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        assert kustomization not in names, f"k8s/{kustomization} would break `kubectl apply -f k8s/`"
    manifests = [n for n in names if n.endswith((".yaml", ".yml", ".json"))]
    assert manifests, "k8s/ holds no manifests"
    for name in manifests:
        assert re.fullmatch(r"\d\d-[a-z0-9-]+\.yaml", name), f"k8s/{name}: name it NN-what.yaml"
    # The namespace must exist before anything is created in it.
    first = load_documents((K8S / manifests[0]).read_text())
    assert [d["kind"] for d in first] == ["Namespace"]


def test_kubectl_reads_k8s_in_name_order():
    """What `kubectl apply -f k8s/` would send, read offline by kubectl's own file walker."""
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (not a Python package: install it to check what it reads)")
    proc = subprocess.run(
        [kubectl, "label", "--local", "-f", str(K8S), "fovea.test/read=1", "-o", "name"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    names = [line.split("/", 1)[1] for line in proc.stdout.split()]
    expected = [d["metadata"]["name"] for d in _base_docs()]
    assert names == expected, "kubectl reads other files, or another order, than k8s/*.yaml"
    assert names[0] == "fovea"  # the Namespace first


def test_cpu_overlay_lists_every_base_manifest():
    overlay = yaml.safe_load((CPU_OVERLAY / "kustomization.yaml").read_text())
    listed = sorted(overlay["resources"])
    assert listed == sorted(f"../{p.name}" for p in K8S.glob("*.yaml")), (
        "k8s/cpu/kustomization.yaml must list exactly k8s/*.yaml"
    )


def test_every_workload_uses_the_same_image():
    containers = _all_containers()
    assert containers
    images = {c.container["image"] for c in containers}
    assert len(images) == 1, f"one image for trainer and server, found {images}"
    (image,) = images
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    for c in containers:
        assert c.container.get("imagePullPolicy") == "IfNotPresent", c.id


# ---------------------------------------------------------------- kubernetes-validate


def _validate_targets() -> list[str]:
    return [_rel(p) for p in RAW_MANIFESTS] + [CPU_SOURCE]


@pytest.mark.parametrize("target", _validate_targets())
def test_manifest_is_valid_for_kubernetes_1_30(target, tmp_path):
    tool = dev_tool("kubernetes-validate")
    if target == CPU_SOURCE:
        docs = _cpu_rendered_or_skip()
        path = tmp_path / "cpu-rendered.yaml"
        path.write_text(yaml.safe_dump_all(docs))
    else:
        path = ROOT / target
    proc = subprocess.run(
        [tool, "--strict", "--kubernetes-version", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    # It must have checked every resource, not merely found nothing to check.
    checked = len(re.findall(r"^INFO .* passed for resource", report, flags=re.M))
    assert checked == len(load_documents(path.read_text())), report


# ---------------------------------------------------------------- checkov


@pytest.fixture(scope="session")
def checkov_report() -> dict:
    """One checkov run over k8s/ (raw manifests and subfolders) per test session: it is slow."""
    tool = dev_tool("checkov")
    proc = subprocess.run(
        [tool, "--framework", "kubernetes", "-d", str(K8S), "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    if isinstance(report, list):  # one entry per framework
        (report,) = report
    return report


def test_checkov_passes(checkov_report):
    summary = checkov_report["summary"]
    results = checkov_report["results"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results["failed_checks"]]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0, summary
    assert summary["passed"] > 100, f"checkov checked too little to mean anything: {summary}"
    scanned = {c["resource"].split(".")[0] for c in results["passed_checks"]}
    assert {"Deployment", "Job", "Service"} <= scanned, scanned


def test_checkov_skips_each_carry_a_reason(checkov_report):
    for c in checkov_report["results"]["skipped_checks"]:
        reason = (c.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason.split()) >= 3, f"{c['check_id']} on {c['resource']} is skipped without a reason"
    # And every skip annotation in the files says why, on its own line.
    for path in RAW_MANIFESTS:
        for doc in load_documents(path.read_text()):
            for key, value in (doc["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    assert re.fullmatch(r"CKV2?_K8S_\d+=\S.{10,}", value), f"{_rel(path)}: {key}: {value}"


# ---------------------------------------------------------------- container arguments vs the real CLI


def _parse(argv: list[str], where: str):
    """Parse `fovea <argv>` with the real parser (a subcommand whose module cannot be imported fails)."""
    from fovea.cli import SUBCOMMANDS, build_parser

    assert argv, f"{where}: no arguments for fovea"
    command, rest = argv[0], argv[1:]
    assert command in SUBCOMMANDS, f"{where}: `fovea {command}` is not a fovea subcommand"
    parser = build_parser(command)  # a missing module or dependency fails here: they are dev deps
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(rest)
    except SystemExit:
        pytest.fail(f"{where}: `fovea {shlex.join(argv)}` does not parse:\n{stderr.getvalue()}")


def _container_ids() -> list[str]:
    return [c.id for c in _all_containers()]


@pytest.mark.parametrize("container_id", _container_ids())
def test_container_args_parse_with_the_fovea_cli(container_id):
    (c,) = [c for c in _all_containers() if c.id == container_id]
    argv = []
    for arg in fovea_argv(c):
        value, missing = expand(arg, c.env)
        assert not missing, f"{c.id}: {arg!r} refers to $({missing[0]}), which no ConfigMap or env sets"
        argv.append(value)
    _parse(argv, c.id)


def test_dockerfile_healthcheck_parses_with_the_fovea_cli():
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, flags=re.M)
    assert match, "no exec-form HEALTHCHECK CMD in the Dockerfile"
    command = json.loads(match.group(1))
    assert command[0] == "fovea", command
    _parse(command[1:], "Dockerfile HEALTHCHECK")


def _flag(args: list[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` in a container's args."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def _config() -> dict[str, str]:
    return _one(_base_docs(), "ConfigMap", "fovea-config")["data"]


def test_configmap_server_settings_are_serve_flags():
    """FOVEA_<FLAG> keys reach `fovea serve` through its environment: each must be a real flag."""
    deployment = _one(_base_docs(), "Deployment", "fovea-server")
    container = _container(deployment, "server")
    base_args = list(container["args"])[1:]
    server_keys = {
        k: v for k, v in _config().items() if k.startswith("FOVEA_") and not k.startswith("FOVEA_TRAIN_")
    }
    assert server_keys, "the ConfigMap holds no server settings"
    for key, value in server_keys.items():
        flag = "--" + key.removeprefix("FOVEA_").lower().replace("_", "-")
        _parse(["serve", *base_args, f"{flag}={value}"], f"ConfigMap {key}")
        from fovea.cli import build_parser

        known = build_parser("serve")._option_string_actions
        assert flag in known, f"ConfigMap {key}: `fovea serve` has no {flag}"


def test_configmap_trainer_settings_are_all_used():
    keys = {k for k in _config() if k.startswith("FOVEA_TRAIN_")}
    assert keys, "the ConfigMap holds no trainer settings"
    job = _container(_one(_base_docs(), "Job", "fovea-train"), "train")
    used = set(re.findall(r"\$\((FOVEA_TRAIN_[A-Z_]+)\)", " ".join(job["args"])))
    assert keys == used, f"unused: {sorted(keys - used)}; undefined: {sorted(used - keys)}"


# ---------------------------------------------------------------- the training Job


def test_training_job():
    docs = _base_docs()
    job = _one(docs, "Job", "fovea-train")
    spec = job["spec"]
    assert 1 <= spec["backoffLimit"] <= 10
    assert spec["ttlSecondsAfterFinished"] > 0
    container = _container(job, "train")
    assert container["resources"]["limits"][GPU] == 1
    args = container["args"]
    assert args[0] == "train" and "--demo-data-if-empty" in args
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}

    def claim_at(flag: str) -> str:
        (value,) = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
        (mount_path,) = [m for m in mounts if value == m or value.startswith(m.rstrip("/") + "/")]
        assert not mounts[mount_path].get("readOnly"), f"{flag} is on a read-only mount"
        return volumes[mounts[mount_path]["name"]]["persistentVolumeClaim"]["claimName"]

    # The backup that a restarted pod resumes from must outlive the pod.
    assert claim_at("--backup-dir") in {
        p["metadata"]["name"] for p in docs if p["kind"] == "PersistentVolumeClaim"
    }
    claim_at("--data")
    # It publishes where the server reads.
    server = _one(docs, "Deployment", "fovea-server")
    server_volumes = server["spec"]["template"]["spec"]["volumes"]
    server_claims = {
        v["persistentVolumeClaim"]["claimName"] for v in server_volumes if "persistentVolumeClaim" in v
    }
    assert claim_at("--models") in server_claims


# ---------------------------------------------------------------- the server


def test_server_deployment():
    deployment = _one(_base_docs(), "Deployment", "fovea-server")
    pod = deployment["spec"]["template"]
    container = _container(deployment, "server")
    assert container["resources"]["limits"][GPU] == 1
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][part]), part
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8500, "metrics": 9090, "http": 8080}
    args = container["args"]
    assert args[0] == "serve"
    assert (_flag(args, "--port"), _flag(args, "--metrics-port"), _flag(args, "--http-port")) == (
        "8500",
        "9090",
        "8080",
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 8500, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9090"
    pod_sc, sc = pod["spec"]["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] and pod_sc.get("runAsUser", 1) != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "RuntimeDefault" in (
        sc.get("seccompProfile", {}).get("type"),
        pod_sc.get("seccompProfile", {}).get("type"),
    )
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    models = mounts[next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)]
    assert models["mountPath"] == _flag(args, "--model-dir") and models["readOnly"] is True
    assert "emptyDir" in volumes[next(n for n, m in mounts.items() if m["mountPath"] == "/tmp")]


def test_termination_grace_outlasts_the_drain():
    deployment = _one(_base_docs(), "Deployment", "fovea-server")
    container = _container(deployment, "server")
    # A flag in args wins over the ConfigMap's FOVEA_GRACE_PERIOD; one of them must set it, so the
    # drain does not silently follow a default chosen elsewhere.
    drain = _flag(container["args"], "--grace-period") or _config().get("FOVEA_GRACE_PERIOD")
    assert drain is not None, "set the drain: --grace-period or FOVEA_GRACE_PERIOD"
    drain = float(drain)
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pause = 0.0
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        pause = float(command[1])
    elif "sleep" in pre_stop:
        pause = float(pre_stop["sleep"]["seconds"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pause + drain + 5, (
        f"terminationGracePeriodSeconds {grace} < preStop {pause} + drain {drain} + 5"
    )


def test_services_autoscaler_and_disruption_budget_select_the_server():
    docs = _base_docs()
    deployment = _one(docs, "Deployment", "fovea-server")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    cluster_ip = _one(docs, "Service", "fovea")
    headless = _one(docs, "Service", "fovea-headless")
    assert cluster_ip["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert headless["spec"]["clusterIP"] == "None"
    for service in (cluster_ip, headless):
        assert selects(service["spec"]["selector"])
        assert any(p["port"] == 8500 for p in service["spec"]["ports"])
    hpa = _one(docs, "HorizontalPodAutoscaler", "fovea-server")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fovea-server",
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; apply would reset it"
    assert selects(_one(docs, "PodDisruptionBudget", "fovea-server")["spec"]["selector"]["matchLabels"])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    allowed = [
        p
        for p in policies
        if selects(p["spec"]["podSelector"].get("matchLabels", {})) and p["spec"].get("ingress")
    ]
    ports = {port["port"] for p in allowed for rule in p["spec"]["ingress"] for port in rule.get("ports", [])}
    assert {"grpc", "metrics"} <= ports or {8500, 9090} <= ports, ports


# ---------------------------------------------------------------- variants


def test_cpu_variant_requests_no_gpu():
    docs = _cpu_rendered_or_skip()
    assert GPU not in yaml.safe_dump_all(docs)
    base = [(d["kind"], d["metadata"]["name"]) for d in _base_docs()]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(base)


def _multiworker_job() -> dict:
    return _one(load_documents((MULTIWORKER / "10-train-job.yaml").read_text()), "Job", "fovea-train-mw")


def test_multiworker_hosts_match_the_indexed_job():
    job = _multiworker_job()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    env = {e["name"]: e.get("value") for e in _container(job, "train")["env"]}
    hosts = env["FOVEA_WORKER_HOSTS"].split(",")
    service = _one(
        load_documents((MULTIWORKER / "00-workers-service.yaml").read_text()), "Service", pod["subdomain"]
    )
    assert service["spec"]["clusterIP"] == "None"
    port = service["spec"]["ports"][0]["port"]
    expected = [
        f"{job['metadata']['name']}-{i}.{pod['subdomain']}:{port}" for i in range(spec["completions"])
    ]
    assert hosts == expected


def test_multiworker_builds_tf_config_and_execs_fovea(tmp_path):
    """Run the container's shell prelude with a stand-in `fovea` that prints what it got."""
    job = _multiworker_job()
    container = _container(job, "train")
    command = container["command"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # The kubelet expands $(VAR) in command too; the prelude must come through it unchanged.
    for part in command:
        assert expand(part, env) == (part, []), "the shell prelude must not contain $(...)"
    fake = tmp_path / "fovea"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$TF_CONFIG" "$@"\n')
    fake.chmod(0o755)
    run_env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "JOB_COMPLETION_INDEX": "1",
        "FOVEA_WORKER_HOSTS": env["FOVEA_WORKER_HOSTS"],
    }
    proc = subprocess.run(
        ["sh", *command[1:], "train", "--epochs=1"], env=run_env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    tf_config = json.loads(lines[-3])
    assert lines[-2:] == ["train", "--epochs=1"]
    assert tf_config == {
        "cluster": {"worker": env["FOVEA_WORKER_HOSTS"].split(",")},
        "task": {"type": "worker", "index": 1},
    }
    # Without the index (not an Indexed Job) it refuses to start rather than guess.
    del run_env["JOB_COMPLETION_INDEX"]
    proc = subprocess.run(
        ["sh", *command[1:], "train"], env=run_env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0 and "JOB_COMPLETION_INDEX" in proc.stderr
