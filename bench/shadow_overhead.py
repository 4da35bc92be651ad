"""Does a 100% shadow delay live callers? Live p99 at half capacity, shadow on and off, interleaved.

    python bench/shadow_overhead.py                  # ResNet50 at 96 px (random weights), 4 pairs of 8 s
    python bench/shadow_overhead.py --models M/NAME  # a model folder of yours: live 1, shadow 2 (or 1)

One server with --poll-interval 0.2. Capacity first (closed loop, concurrency 8, shadow off); then an open
loop (Poisson) at --load x capacity in alternating windows, shadow off / on / off / on ..., switched by
rewriting rollout.json between windows (the server polls it): live traffic always goes to version 1
(`traffic: {stable: 1}`), the shadow, when on, is version 2 (a copy of 1 if the folder has one version)
at share 1.0. The machine's speed drifts (it is shared), so pairs of neighbouring windows are compared:
per-window p99s, per-pair ratios and their median. The shadow counters (computed / dropped_busy) show
what the shadow did in each window; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# run.py puts client/, server/ and trainer/ on sys.path when imported.
from overload import machine_load  # noqa: E402
from run import log, make_models, make_payloads, run_loadgen, start_server, stop_server  # noqa: E402


def shadow_counts(server, model: str) -> dict[str, float]:
    """fovea_shadow_requests_total of MODEL by outcome (computed, dropped_busy, ...)."""
    out: dict[str, float] = {}
    for s in server.metrics():
        if s.name == "fovea_shadow_requests_total" and s.labels.get("model") == model:
            out[s.labels["outcome"]] = out.get(s.labels["outcome"], 0.0) + s.value
    return out


def rollout_data(on: bool, shadow_version: int) -> dict:
    """Live traffic always on version 1; the "shadow" label tells when the server has read the file."""
    data: dict = {"labels": {"stable": 1}, "traffic": {"stable": 1}}
    if on:
        data["labels"]["shadow"] = shadow_version
        data["shadow"] = {"version": shadow_version, "share": 1.0}
    return data


def set_shadow(server, folder: Path, on: bool, shadow_version: int) -> None:
    """Write rollout.json and wait until the server has read it (its ListModels labels change)."""
    from fovea.client import Client
    from fovea.contract import rollout

    data = rollout_data(on, shadow_version)
    rollout.write(str(folder), rollout.validate(data))
    deadline = time.monotonic() + 30
    with Client(server.target) as client:
        while time.monotonic() < deadline:
            models = {m.name: m for m in client.list_models(timeout=5)}
            if ("shadow" in models[folder.name].version_labels) == on:
                return
            time.sleep(0.1)
    raise TimeoutError("the server did not pick up rollout.json within 30 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="a model folder MODELS/NAME (default: ResNet50 96 px)")
    parser.add_argument("--bench-model", choices=["resnet50", "tiny"], default="resnet50",
                        help="without --models: bench/make_models.py's model to use")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=4, help="off/on window pairs")
    parser.add_argument("--window", type=float, default=8.0, help="seconds per window (after 1 s warm-up)")
    parser.add_argument("--load", type=float, default=0.5, help="open-loop rate as a share of capacity")
    parser.add_argument("--shadow-version", type=int, default=2,
                        help="2: another version (a copy of 1 if needed); 1: the live version itself")  # fmt: skip
    parser.add_argument("--server-flags", default="--no-xla", help="extra `fovea serve` flags")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fovea-shadow-bench-"))
    if args.models:
        root = work / "models"
        shutil.copytree(
            args.models, root / args.models.name, ignore=shutil.ignore_patterns(".*", "rollout.json")
        )
        folder = root / args.models.name
    else:
        root = work / "models"
        make_models(root, [args.bench_model])
        folder = root / args.bench_model
    versions = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    if 2 not in versions:
        shutil.copytree(folder / str(versions[0]), folder / "2")
        log("shadow version 2 is a copy of version 1")
    if versions[0] != 1:
        raise SystemExit(f"{folder}: expected a version 1, found {versions}")
    from fovea.contract import rollout

    meta = json.loads((folder / "1" / "assets.extra" / "fovea.json").read_text())
    payload = make_payloads(work, meta["input_size"]["height"])["jpeg"]
    # Written before the server starts: version 2 is never the live one, even for the capacity run.
    rollout.write(str(folder), rollout.validate(rollout_data(False, args.shadow_version)))

    log(f"before: {machine_load()}")
    server = start_server(root, ["--poll-interval", "0.2", *args.server_flags.split()])
    try:
        closed = ["--mode", "closed", "--concurrency", "8", "--warmup", "2", "--duration", "8"]
        capacity = run_loadgen(server.target, payload, *closed)["throughput"]
        rate = args.load * capacity
        log(
            f"capacity {capacity:.1f} req/s (closed loop, concurrency 8, shadow off); open loop at {rate:.1f}"
        )
        rows = []
        for pair in range(args.pairs):
            for on in (False, True):
                set_shadow(server, folder, on, args.shadow_version)
                before = shadow_counts(server, folder.name)
                r = run_loadgen(server.target, payload, "--mode", "open", "--rate", f"{rate:.3f}",
                                "--warmup", "1", "--duration", str(args.window))  # fmt: skip
                time.sleep(0.5)  # shadow runs of the last answers
                after = shadow_counts(server, folder.name)
                delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                rows.append({"pair": pair, "shadow": on, **r, "shadow_counts": delta})
                log(
                    f"pair {pair} shadow {'on ' if on else 'off'}: {r['requests']} OK, {r['errors']} errors, "
                    f"{r['throughput']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; "
                    f"shadow {', '.join(f'{k} {v:g}' for k, v in sorted(delta.items())) or 'none'}"
                )
    finally:
        stop_server(server)
    log(f"after: {machine_load()}")
    ratios = []
    for pair in range(args.pairs):
        off, on = (row for row in rows if row["pair"] == pair)
        ratios.append(on["p99_ms"] / off["p99_ms"])
    log(
        f"p99 on/off per pair: {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}"
    )
    p50s = [on["p50_ms"] / off["p50_ms"] for off, on in zip(rows[::2], rows[1::2], strict=True)]
    log(f"p50 on/off per pair: {', '.join(f'{x:.2f}' for x in p50s)}; median {statistics.median(p50s):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
