"""`fovea demo`: generate data, train, serve, classify and summarise, end to end.

The demo drives the real commands in subprocesses (`fovea demo-data`, `fovea train`, `fovea serve`)
and talks to the server only through the thin client and /metrics, exactly as a user would. It needs
the `server` and `trainer` extras for those subprocesses (fovea.devtools says so on import); this module
itself imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from fovea import contract
from fovea.cli import CLIError
from fovea.devtools import prom_text
from fovea.devtools.server_process import ServerProcess, ServerStartError

STEPS = (
    "generate demo data",
    "train",
    "start the server",
    "classify held-out images",
    "show the predictions",
    "summarise /metrics",
    "show the training report",
    "stop the server",
)
# Where the Keras ImageNet weights come from; probed once so an offline machine falls back quickly.
IMAGENET_PROBE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
MODEL_NAME = "demo"


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("fovea-demo"),
        help="where data, models and reports go (default: ./fovea-demo)",
    )
    parser.add_argument(
        "--weights",
        default="auto",
        help="auto (ImageNet when it can be downloaded, else random init), imagenet, none, "
        "or a local .h5 path",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="training input size in px (default: 96 with ImageNet weights, 64 without)",
    )
    parser.add_argument("--classes", type=int, default=None, help="demo classes (default: the generator's)")
    parser.add_argument("--per-class", type=int, default=None, help="training images per class")
    parser.add_argument(
        "--epochs", type=int, default=None, help="phase 1 epochs (default: the trainer's choice)"
    )
    parser.add_argument(
        "--fine-tune-epochs", type=int, default=None, help="phase 2 epochs (default: the trainer's choice)"
    )
    parser.add_argument(
        "--heldout-per-class", type=int, default=4, help="held-out images per class to classify"
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for the server to load and warm up",
    )


def run(command: str, args: argparse.Namespace) -> int:
    workdir: Path = args.workdir.resolve()
    data, heldout, models = workdir / "data", workdir / "heldout", workdir / "models"
    started = time.monotonic()
    server: ServerProcess | None = None
    try:
        with _step(1):
            _generate(data, args, seed=0)
            _generate(heldout, args, seed=1, per_class=args.heldout_per_class)
        with _step(2):
            weights, input_size = _choose_weights(args)
            version_dir = _train(data, models, weights, input_size, workdir, args)
        with _step(3):
            server = _start_server(models, args.ready_timeout)
        with _step(4):
            files = sorted(p for p in heldout.rglob("*") if p.is_file())
            predictions = _classify(server, files)
        with _step(5):
            _print_table(files, predictions, heldout)
        with _step(6):
            _print_metrics(server)
        with _step(7):
            _print_report(version_dir)
        with _step(8):
            code = _stop_server(server)
            server = None
            print(f"      server exited with code {code}")
    finally:
        if server is not None:
            server.kill()
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s. Everything is under {workdir}")
    return 0


@contextlib.contextmanager
def _step(number: int) -> Iterator[None]:
    name = STEPS[number - 1]
    print(f"\n[{number}/{len(STEPS)}] {name.capitalize()}", flush=True)
    t0 = time.monotonic()
    try:
        yield
    except CLIError as exc:
        raise CLIError(f"step {number} ({name}) failed: {exc}") from None
    except Exception as exc:  # the demo must end with one line saying which step broke
        raise CLIError(f"step {number} ({name}) failed: {type(exc).__name__}: {exc}") from None
    print(f"      done in {time.monotonic() - t0:.1f} s", flush=True)


def _fovea(*argv: str) -> list[str]:
    return [sys.executable, "-m", "fovea.cli", *argv]


def _run_visible(argv: list[str], what: str) -> None:
    # Inherit the terminal so Keras progress bars render as they would for the user.
    code = subprocess.call(argv)
    if code != 0:
        raise CLIError(f"`{what}` exited with code {code} (its output is above)")


def _generate(target: Path, args: argparse.Namespace, seed: int, per_class: int | None = None) -> None:
    argv = ["demo-data", str(target), "--seed", str(seed)]
    if args.classes:
        argv += ["--classes", str(args.classes)]
    if per_class or args.per_class:
        argv += ["--per-class", str(per_class or args.per_class)]
    _run_visible(_fovea(*argv), "fovea demo-data")


def _imagenet_reachable(timeout: float = 3.0) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(IMAGENET_PROBE_URL, method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # the host answered; the download itself will tell
    except (OSError, ValueError):
        return False


def _choose_weights(args: argparse.Namespace) -> tuple[str, int]:
    weights = args.weights
    if weights == "auto":
        if _imagenet_reachable():
            weights = "imagenet"
        else:
            weights = "none"
            print(
                "      ImageNet weights cannot be downloaded here: training from random initialisation "
                "at a small input size instead."
            )
    size = args.input_size or (96 if weights != "none" else 64)
    return weights, size


def _train(
    data: Path, models: Path, weights: str, input_size: int, workdir: Path, args: argparse.Namespace
) -> Path:
    extra = []
    if args.epochs is not None:
        extra += ["--epochs", str(args.epochs)]
    if args.fine_tune_epochs is not None:
        extra += ["--fine-tune-epochs", str(args.fine_tune_epochs)]
    _run_visible(
        _fovea(
            "train",
            "--data",
            str(data),
            "--models",
            str(models),
            "--name",
            MODEL_NAME,
            "--weights",
            weights,
            "--input-size",
            str(input_size),
            "--backup-dir",
            str(workdir / "backup"),
            *extra,
        ),
        "fovea train",
    )
    model_root = models / MODEL_NAME
    versions = contract.local_published_versions(model_root)
    if not versions:
        raise CLIError(f"training finished but published nothing under {model_root}")
    return models / MODEL_NAME / str(versions[-1])


def _start_server(models: Path, ready_timeout: float) -> ServerProcess:
    server = ServerProcess(models, echo=lambda line: print(f"      server | {line}", flush=True))
    try:
        server.start(ready_timeout)
    except ServerStartError as exc:
        raise CLIError(str(exc)) from None
    print(f"      SERVING on {server.target}, metrics on :{server.metrics_port}/metrics")
    return server


def _classify(server: ServerProcess, files: list[Path]) -> list:
    """One request per image, all at once, the way many independent callers would arrive."""
    from fovea.client import AsyncClient

    async def go() -> list:
        async with AsyncClient(server.target) as client:
            results = await asyncio.gather(*(client.predict([f], top_k=3, timeout=60.0) for f in files))
        return [r[0] for r in results]

    return asyncio.run(go())


def _print_table(files: list[Path], predictions: list, root: Path) -> None:
    rows = []
    correct = 0
    for path, pred in zip(files, predictions, strict=True):
        truth = path.parent.name
        best = pred.top[0]
        correct += best.label == truth
        rows.append(
            (
                str(path.relative_to(root)),
                truth,
                best.label,
                f"{best.score:.3f}",
                "ok" if best.label == truth else "MISS",
            )
        )
    headers = ("image", "true label", "prediction", "score", "")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in (headers, *rows):
        print("      " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(
        f"      {correct}/{len(rows)} correct ({correct / max(len(rows), 1):.0%}), "
        f"model {predictions[0].model_name} v{predictions[0].model_version}"
    )


def _print_metrics(server: ServerProcess) -> None:
    samples = prom_text.scrape(server.metrics_url)
    requests = prom_text.total(samples, "fovea_requests_total", method="Predict")
    print(f"      Predict requests: {requests:.0f}")
    sizes = prom_text.per_bucket(prom_text.buckets(samples, "fovea_batch_size_images"))
    if sizes:
        seen = ", ".join(f"<={_num(bound)}: {count:.0f}" for bound, count in sizes)
        print(f"      batches by size: {seen}")
    latency = prom_text.buckets(samples, "fovea_request_duration_seconds", method="Predict")
    if latency:
        p = {q: prom_text.quantile(q, latency) * 1000 for q in (0.5, 0.9, 0.99)}
        print(
            "      request latency (from histogram buckets): "
            + ", ".join(f"p{int(q * 100)} {v:.0f} ms" for q, v in p.items() if not math.isnan(v))
        )


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def _print_report(version_dir: Path) -> None:
    print(f"      published model: {version_dir}")
    report = version_dir / "report"
    for name in ("metrics.json", "training_curves.png", "confusion_matrix.png"):
        path = report / name
        print(f"      {name:<22} {path}" + ("" if path.exists() else "  (missing)"))


def _stop_server(server: ServerProcess) -> int:
    try:
        return server.stop(timeout=60.0)
    except TimeoutError as exc:
        raise CLIError(str(exc)) from None


# `python -m fovea.devtools.demo_command` is `fovea demo`.
if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from fovea.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
