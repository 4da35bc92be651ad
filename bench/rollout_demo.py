"""Issue 19's "What it must show", run for real on the demo data: gate, labels, canary split, shadow.

    python bench/rollout_demo.py [--workdir DIR] [--epochs 2 --fine-tune-epochs 6] [--requests 500]

Steps (each prints its figures): `fovea demo-data`, split once into DATA/{train,val,test}/<label> so every
training and the gate see the same held-out test images; train version 1; train again with --gate
(published as 2); train a third time on a copy whose train and val labels are permuted (the test split
keeps its true labels) and expect a rejection (non-zero exit, one line, a report under .rejected/, no
version 3); `fovea rollout --label stable=1 --label canary=2 --traffic stable=80,canary=20`; a server
answers N unlabelled fovea.v1 Predicts (count of model_spec.version with a Wilson 95% interval), sticky
x-fovea-route-key checks, a version_label "canary" Predict over fovea.v1 and TF Serving, then
`--shadow 2:1.0` and the shadow figures from /metrics.

Why the test split keeps true labels: the gate evaluates the candidate and the reference on *this run's*
test split. If the whole export were shuffled (DATA/<label> layout), the reference's answers would be
scored against shuffled truth too, and both sides sit at chance: the comparison could not see the damage.
A broken training export against a trusted held-out test set is the case the gate can judge honestly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROUTE_KEY = "x-fovea-route-key"


def say(line: str = "") -> None:
    print(line, flush=True)


def fovea(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `fovea` CLI of this tree; its output is echoed as it was."""
    argv = [sys.executable, "-m", "fovea.cli", *args]
    say(f"$ fovea {' '.join(args)}")
    started = time.monotonic()
    done = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    )
    say(f"  (exit {done.returncode}, {time.monotonic() - started:.0f} s)")
    if check and done.returncode != 0:
        sys.stdout.write(done.stdout + done.stderr)
        raise SystemExit(f"`fovea {args[0]}` failed with exit code {done.returncode}")
    return done


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def split(data: Path, out: Path, seed: int) -> None:
    """DATA/<label>/* -> OUT/{train,val,test}/<label>/* (80/10/10 per class, fixed by the seed)."""
    rng = random.Random(seed)
    for label_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(label_dir.iterdir())
        rng.shuffle(files)
        n_val = n_test = max(1, len(files) // 10)
        parts = {
            "test": files[:n_test],
            "val": files[n_test : n_test + n_val],
            "train": files[n_test + n_val :],
        }
        for part, chosen in parts.items():
            target = out / part / label_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy2(f, target / f.name)


def shuffled_copy(clean: Path, out: Path, seed: int) -> float:
    """A copy of CLEAN whose train and val labels are permuted (class counts kept); test kept as is.

    Returns the share of train+val images whose label is still their true one."""
    rng = random.Random(seed)
    shutil.copytree(clean / "test", out / "test")
    kept = total = 0
    for part in ("train", "val"):
        files = sorted((p.parent.name, p) for p in (clean / part).glob("*/*"))
        labels = [label for label, _ in files]
        rng.shuffle(labels)
        for (true_label, path), new_label in zip(files, labels, strict=True):
            target = out / part / new_label
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / f"{true_label}_{path.name}")
            kept += new_label == true_label
            total += 1
    return kept / total


def metadata(models: Path, version: int) -> dict:
    from fovea import contract

    return json.loads((models / "demo" / str(version) / contract.METADATA_FILE).read_text())


def published(models: Path) -> list[int]:
    return sorted(int(p.name) for p in (models / "demo").iterdir() if p.name.isdigit())


def gate_line(gate: dict | None) -> str:
    if not gate:
        return "gate: none recorded"
    if gate.get("skipped"):
        return f"gate: skipped ({gate['reason']})"
    verdict = "passed" if gate["passed"] else f"REJECTED: {gate['reason']}"
    return (
        f"gate vs version {gate['reference_version']}: candidate {gate['candidate_accuracy']:.4f}, "
        f"reference {gate['reference_accuracy']:.4f} (tolerance {gate['tolerance']:g}, "
        f"class tolerance {gate['class_tolerance']:g}): {verdict}"
    )


def per_class_line(gate: dict) -> str:
    return ", ".join(
        f"{label} {row['candidate_recall']:.2f} vs {row['reference_recall']:.2f}"
        for label, row in gate.get("per_class", {}).items()
    )


def shadow_samples(url: str) -> list:
    """The server's fovea_shadow_* samples (devtools' Prometheus text parser)."""
    from fovea.devtools import prom_text

    return [s for s in prom_text.scrape(url, timeout=10) if s.name.startswith("fovea_shadow")]


def exposition(sample) -> str:
    """A sample as the /metrics line it came from (labels in name order, as prometheus_client writes)."""
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
    return f"{sample.name}{{{labels}}} {sample.value!r}"


def train_steps(args: argparse.Namespace, raw: Path, clean: Path, broken: Path, models: Path) -> None:
    """Steps 1-4: the data, version 1, the gated retrain (version 2), the shuffled-label retrain."""
    say("\n== 1. demo data, split once into train/val/test")
    fovea("demo-data", str(raw), "--seed", str(args.seed))
    split(raw, clean, args.seed)
    counts = {part: len(list((clean / part).glob("*/*"))) for part in ("train", "val", "test")}
    say(f"split: {counts}")
    kept = shuffled_copy(clean, broken, args.seed + 1)
    say(f"shuffled copy: train+val labels permuted, {kept:.1%} still on their true label; test unchanged")

    common = ["train", "--models", str(models), "--name", "demo", "--input-size", "64", "--no-audit",
              "--verbose", "0"]  # fmt: skip
    # The retrains continue from version 1 (a retrain of the served model, as in production), with the
    # from-scratch learning rate, batch and unfrozen layers (a published parent counts as pretrained,
    # whose defaults, lr 1e-5 on the top 30 layers, barely move a model that started from random weights).
    retrain = [*common, "--weights", str(models / "demo" / "1"), "--epochs", "1",
               "--fine-tune-epochs", args.retrain_epochs, "--fine-tune-learning-rate", "3e-4",
               "--fine-tune-layers", "0", "--batch-size", "16", "--gate"]  # fmt: skip

    say("\n== 2. version 1 (from random weights)")
    fovea(*common, "--data", str(clean), "--weights", "none", "--epochs", args.epochs,
          "--fine-tune-epochs", args.fine_tune_epochs)  # fmt: skip
    m1 = metadata(models, 1)
    say(
        f"version 1 test accuracy {m1['metrics']['test_accuracy']:.4f} on {m1['metrics']['test']['support']} "
        f"images (chance {1 / len(m1['labels']):.2f}); warnings {m1['metrics'].get('warnings')}"
    )
    say(gate_line(m1["metrics"].get("gate")))

    say("\n== 3. version 2: a retrain from version 1, gate on")
    fovea(*retrain, "--data", str(clean))
    m2 = metadata(models, 2)
    gate2 = m2["metrics"].get("gate")
    say(
        f"version 2 test accuracy {m2['metrics']['test_accuracy']:.4f}; warnings {m2['metrics'].get('warnings')}"
    )
    say(gate_line(gate2))
    if gate2 and not gate2.get("skipped"):
        say(f"per-class recall (candidate vs reference): {per_class_line(gate2)}")
    say(f"published: {published(models)}")

    say("\n== 4. the same retrain on the copy with shuffled train/val labels, gate on")
    done = fovea(*retrain, "--data", str(broken), check=False)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    say(f"exit code {done.returncode}; last stderr line: {last}")
    rejected = (
        sorted((models / "demo" / ".rejected").glob("*")) if (models / "demo" / ".rejected").exists() else []
    )
    say(f".rejected/: {[p.name for p in rejected]}")
    for r in rejected:
        gate3 = json.loads((r / "gate.json").read_text())
        say(gate_line(gate3))
        say(f"per-class recall (candidate vs reference): {per_class_line(gate3)}")
        say(f"report: {r / 'report' / 'index.html'} exists={(r / 'report' / 'index.html').exists()}")
    say(f"published: {published(models)} (version 3 exists: {(models / 'demo' / '3').exists()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where data and models go (default: a temp dir, kept)")
    parser.add_argument("--epochs", default="2", help="version 1's --epochs (phase 1)")
    parser.add_argument("--fine-tune-epochs", default="8", help="version 1's --fine-tune-epochs (phase 2)")
    parser.add_argument("--retrain-epochs", default="8", help="the retrains' --fine-tune-epochs")
    parser.add_argument("--requests", type=int, default=500, help="unlabelled Predicts for the share count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--serve-only", action="store_true", help="steps 5-6 on --workdir's models as they are"
    )
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fovea-rollout-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    raw, clean, broken, models = work / "raw", work / "data", work / "data-shuffled", work / "models"
    if args.serve_only:
        if not (models / "demo" / "2").is_dir():
            raise SystemExit(f"--serve-only: {models}/demo has no version 2 (run without it first)")
        say(f"workdir {work} (--serve-only: its data and versions as they are)")
    else:
        for p in (raw, clean, broken, models):
            shutil.rmtree(p, ignore_errors=True)
        say(f"workdir {work}")
    started = time.monotonic()
    if not args.serve_only:
        train_steps(args, raw, clean, broken, models)

    say("\n== 5. labels and a weighted canary")
    out = fovea("rollout", str(models / "demo"), "--label", "stable=1", "--label", "canary=2",
                "--traffic", "stable=80,canary=20")  # fmt: skip
    sys.stdout.write(out.stdout)
    say(f"rollout.json: {(models / 'demo' / 'rollout.json').read_text().strip()}")

    import grpc
    from fovea.devtools import prom_text
    from fovea.devtools.server_process import ServerProcess
    from fovea.v1 import classifier_pb2 as pb
    from fovea.v1 import classifier_pb2_grpc

    images = sorted((clean / "test").glob("*/*.png"))
    payloads = [p.read_bytes() for p in images]
    server = ServerProcess(models, ["--poll-interval", "0.5"]).start(ready_timeout=300)
    try:
        channel = grpc.insecure_channel(server.target)
        stub = classifier_pb2_grpc.ClassifierServiceStub(channel)

        def predict(i: int, label: str = "", key: str = "") -> int:
            request = pb.PredictRequest(model_spec=pb.ModelSpec(name="demo", version_label=label))
            request.images.append(pb.Image(encoded=payloads[i % len(payloads)]))
            metadata = ((ROUTE_KEY, key),) if key else None
            return stub.Predict(request, timeout=60, metadata=metadata).model_spec.version

        n = args.requests
        versions = Counter(predict(i) for i in range(n))
        k = versions.get(2, 0)
        low, high = wilson(k, n)
        say(f"{n} unlabelled fovea.v1 Predicts answered by version: {dict(sorted(versions.items()))}")
        say(f"version 2 share {k / n:.3f}, Wilson 95% interval [{low:.3f}, {high:.3f}] (target 0.20)")

        keys = [f"user-{i}" for i in range(20)]
        per_key = {key: {predict(j, key=key) for j in range(10)} for key in keys}
        sticky = all(len(v) == 1 for v in per_key.values())
        sides = Counter(next(iter(v)) for v in per_key.values() if len(v) == 1)
        say(f"route keys: {len(keys)} keys x 10 Predicts; every key answered by one version: {sticky}; "
            f"keys per version {dict(sorted(sides.items()))}")  # fmt: skip

        say(f"version_label 'canary' over fovea.v1: answered by version {predict(0, label='canary')}")
        say(f"version_label 'stable' over fovea.v1: answered by version {predict(0, label='stable')}")
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        tf_request = predict_pb2.PredictRequest()
        tf_request.model_spec.name = "demo"
        tf_request.model_spec.version_label = "canary"
        tf_request.inputs["images"].dtype = 7  # DT_STRING: encoded image bytes
        tf_request.inputs["images"].tensor_shape.dim.add(size=1)
        tf_request.inputs["images"].string_val.append(payloads[0])
        tf_response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            tf_request, timeout=60
        )
        say(
            f"version_label 'canary' over TF Serving Predict: answered by version {tf_response.model_spec.version.value}"
        )

        say("\n== 6. shadow: --shadow 2:1.0")
        out = fovea("rollout", str(models / "demo"), "--shadow", "2:1.0")
        sys.stdout.write(out.stdout)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the server polls the file every 0.5 s
            predict(0)
            if prom_text.total(shadow_samples(server.metrics_url), "fovea_shadow_requests_total"):
                break
            time.sleep(0.5)
        before = shadow_samples(server.metrics_url)
        shadowed = 100
        live = Counter(predict(i) for i in range(shadowed))
        time.sleep(2)  # shadow runs happen after the live answer
        after = shadow_samples(server.metrics_url)
        say(
            f"{shadowed} more unlabelled Predicts (live versions {dict(sorted(live.items()))}); shadow metrics:"
        )
        for name in ("fovea_shadow_requests_total", "fovea_shadow_images_total", "fovea_shadow_top1_equal_total",
                     "fovea_shadow_score_abs_diff_sum_total"):  # fmt: skip
            for sample in (s for s in after if s.name == name):
                delta = sample.value - prom_text.total(before, name, **sample.labels)
                say(f"  {exposition(sample)}   (+{delta:g} during these {shadowed})")
        images_total = prom_text.total(after, "fovea_shadow_images_total")
        equal = prom_text.total(after, "fovea_shadow_top1_equal_total")
        if images_total:
            say(f"top-1 agreement live vs shadow: {equal:g}/{images_total:g} = {equal / images_total:.3f}")
        out = fovea("rollout", str(models / "demo"), "--metrics", server.metrics_url)
        sys.stdout.write(out.stdout)
        channel.close()
    finally:
        server.stop()
    say(f"\ndone in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
