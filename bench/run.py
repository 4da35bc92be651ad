"""fovea benchmarks: how close the served model comes to its own in-process speed, in one run.

    python bench/run.py            # full run, ResNet50 at 96 px and a tiny CNN (about 10 minutes)
    python bench/run.py --quick    # seconds, tiny model only: keeps the harness working in CI
    python bench/peers.py          # optional, first: PyTriton and MLServer, folded into this run

Writes results.csv, results.md, summary.json and PNG plots under --out (default bench/results/), and
with a full run also docs/benchmarks.md. Every figure comes from this run on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path[:0] = [str(ROOT / d) for d in ("client", "server", "trainer", "devtools")]

from fovea.devtools import prom_text  # noqa: E402
from fovea.devtools.environment import subprocess_env  # noqa: E402
from fovea.devtools.server_process import ServerProcess, ServerStartError  # noqa: E402

sys.path.insert(0, str(BENCH))
from report_files import keep_sections, machine, merge_summary  # noqa: E402

BATCH_SIZE_METRIC = "fovea_batch_size_images"
PEER_NAMES = {
    "pytriton": "PyTriton 0.7 (dynamic batcher, delay 0)",
    "pytriton-xla": "PyTriton 0.7, XLA-compiled signature",
    "mlserver": "MLServer 1.7 (adaptive batching, 2 ms)",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- server process


class Server(ServerProcess):
    """The shared server subprocess, plus what the benchmark reads off it."""

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> list[prom_text.Sample]:
        return prom_text.scrape(self.metrics_url)


def start_server(
    models: Path, extra: list[str], timeout: float = 300.0, echo: Callable[[str], None] | None = None
) -> Server:
    """A started `fovea serve` (SERVING); `echo` sees each line of its output as it comes."""
    server = Server(models, extra, env=subprocess_env(), echo=echo)
    try:
        return server.start(timeout)
    except ServerStartError as exc:
        raise RuntimeError(f"{exc}:\n" + "\n".join(server.output[-30:])) from None


def wait_for_xla(server: Server, timeout: float = 900.0) -> str | None:
    """Block until the server has compiled its XLA sizes (a background job after SERVING), so that
    no measurement runs beside the compiler, and return the log line that says how it went; None at
    once for a server started with --no-xla."""
    if "--no-xla" in server.argv:
        return None
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        for line in server.output:
            if "XLA: compiled" in line or "XLA compile failed" in line:
                return line
        time.sleep(0.2)
    raise RuntimeError("the server did not report its XLA compile in time")


def stop_server(server: Server) -> None:
    # A stop that times out has killed the server; the measurements are already taken.
    with contextlib.suppress(TimeoutError):
        server.stop(timeout=60.0)


# --------------------------------------------------------------------------- measurements


def raw_ceiling(version_dir: Path, batch_sizes: list[int], seconds: float) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH / "raw.py"),
            "--model",
            str(version_dir),
            "--batch-sizes",
            ",".join(map(str, batch_sizes)),
            "--seconds",
            str(seconds),
        ],
        env=subprocess_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def batch_histogram(before: list, after: list) -> tuple[float, str]:
    """Mean batch size and the sizes seen between two scrapes."""
    b0 = dict(prom_text.buckets(before, BATCH_SIZE_METRIC))
    b1 = prom_text.buckets(after, BATCH_SIZE_METRIC)
    delta = [(bound, count - b0.get(bound, 0.0)) for bound, count in b1]
    total = prom_text.total(after, f"{BATCH_SIZE_METRIC}_count") - prom_text.total(
        before, f"{BATCH_SIZE_METRIC}_count"
    )
    summed = prom_text.total(after, f"{BATCH_SIZE_METRIC}_sum") - prom_text.total(
        before, f"{BATCH_SIZE_METRIC}_sum"
    )
    seen = " ".join(f"<={b:g}:{c:.0f}" for b, c in prom_text.per_bucket(delta))
    return (summed / total if total else float("nan")), seen


def run_loadgen(target: str, payload: Path, *args: str) -> dict:
    """One bench/loadgen.py run in its own process (so its CPU is its own); its JSON result."""
    argv = [sys.executable, str(BENCH / "loadgen.py"), "--target", target, "--payload", str(payload), *args]
    out = subprocess.run(argv, env=subprocess_env(), check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def load_point(
    server: Server, payload: Path, mode: str, level: float, warmup: float, duration: float
) -> dict:
    before, cpu0, t0 = server.metrics(), server.cpu_seconds(), time.monotonic()
    load = ["--concurrency", str(int(level))] if mode == "closed" else ["--rate", str(level)]
    result = run_loadgen(
        server.target, payload, "--mode", mode, "--warmup", str(warmup), "--duration", str(duration), *load
    )
    wall = time.monotonic() - t0
    mean_batch, seen = batch_histogram(before, server.metrics())
    result.update(
        mean_batch=mean_batch,
        batches_seen=seen,
        server_cpu_cores=(server.cpu_seconds() - cpu0) / wall,
        loadgen_cpu_cores=result["loadgen_cpu_s"] / wall,
        server_peak_rss_mb=server.peak_rss_mb(),
    )
    return result


# --------------------------------------------------------------------------- orchestration


def make_models(models: Path, which: list[str], *flags: str) -> None:
    subprocess.run(
        [
            sys.executable,
            str(BENCH / "make_models.py"),
            "--out",
            str(models),
            "--which",
            ",".join(which),
            *flags,
        ],
        env=subprocess_env(),
        check=True,
        capture_output=True,
        text=True,
    )


def make_payloads(folder: Path, size: int) -> dict[str, Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    npy, jpg = folder / f"img{size}.npy", folder / f"img{size}.jpg"
    np.save(npy, pixels)
    Image.fromarray(pixels).save(jpg, quality=90)
    return {"uint8": npy, "jpeg": jpg}


def run(args: argparse.Namespace) -> dict:
    quick = args.quick
    work = Path(tempfile.mkdtemp(prefix="fovea-bench-"))
    models = work / "models"
    which = ["tiny"] if quick else ["resnet50", "tiny"]
    log(f"exporting models ({', '.join(which)}) with the trainer's export code")
    make_models(models, which)
    rows: list[dict] = []
    summary: dict = {"quick": quick, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    # Whatever else runs on the machine shows here: the 1-minute load average, sampled per point.
    load_samples = [os.getloadavg()[0]]
    warmup, duration = (0.5, 2.0) if quick else (3.0, args.seconds)

    main_model = "tiny" if quick else "resnet50"
    main_size = 32 if quick else 96
    payloads = make_payloads(work, main_size)
    ceiling_sizes = [1, 4, 32] if quick else [1, 4, 16, 32] if args.lean else [1, 2, 4, 8, 16, 32]
    ceilings: list[dict] = []

    def measure_ceiling(when: str) -> None:
        # Measured before and after the servers run; per batch size the better of the two counts,
        # so noise from anything else on the machine can only make the server look worse.
        log(f"raw signature throughput of {main_model}, plain and XLA (the ceiling, {when})")
        measured = raw_ceiling(models / main_model / "1", ceiling_sizes, 1.0 if quick else 5.0)["rows"]
        for r in measured:
            ceilings.append(r)
            for setup, prefix in (("raw signature", ""), ("raw XLA", "xla_")):
                rows.append(
                    {
                        "model": main_model,
                        "setup": setup,
                        "encoding": "uint8",
                        "mode": f"in-process, {when}",
                        "level": r["batch_size"],
                        "throughput": r[f"{prefix}images_per_s"],
                        "p50_ms": r[f"{prefix}p50_ms"],
                    }
                )

    measure_ceiling("before")

    concurrencies = [1, 4] if quick else [1, 4, 16, 64]
    # "batched" is the defaults; "previous" the defaults before issue 13 (no XLA, a batch starts with
    # whatever is queued), measured in the same run so the two compare on the same machine state.
    setups: dict[str, tuple[list[str], list[str]]] = {
        "batched": ([], ["uint8", "jpeg"]),
        "previous": (["--no-xla", "--batch-formation", "eager"], ["uint8"]),
        "unbatched": (["--max-batch-size", "1"], ["uint8"]),
    }
    if quick:
        setups = {"batched": setups["batched"]}
    elif args.lean:
        setups = {"batched": ([], ["uint8"]), "previous": setups["previous"]}
    open_rates: list[float] = []
    peak_rss = 0.0
    model_dir = work / f"serve-{main_model}"
    model_dir.mkdir()
    (model_dir / main_model).symlink_to(models / main_model)
    for setup, (flags, encodings) in setups.items():
        log(f"server {setup}: starting")
        started = time.monotonic()
        server = start_server(model_dir, [*flags, *args.server_flags.split()])
        if setup == "batched":
            summary["cold_start_s"] = time.monotonic() - started
        try:
            xla_log = wait_for_xla(server)
            if xla_log and setup == "batched":
                summary["xla_compiled_s"] = time.monotonic() - started
                summary["xla_log"] = xla_log
            for encoding in encodings:
                for c in concurrencies:
                    r = load_point(server, payloads[encoding], "closed", c, warmup, duration)
                    load_samples.append(os.getloadavg()[0])
                    log(
                        f"{setup} {encoding} closed c={c}: {r['throughput']:.1f} req/s p50 {r['p50_ms']:.1f} ms "
                        f"mean batch {r['mean_batch']:.1f}, server {r['server_cpu_cores']:.2f} cores, "
                        f"loadgen {r['loadgen_cpu_cores']:.2f} cores"
                    )
                    rows.append(
                        {
                            "model": main_model,
                            "setup": setup,
                            "encoding": encoding,
                            "mode": "closed",
                            "level": c,
                            **r,
                        }
                    )
            if setup == "batched":
                # Open-loop rates are fractions of what the defaults sustain (their best closed-loop
                # point); every setup that runs open loop gets the same rates.
                capacity = max(
                    r["throughput"] for r in rows if r.get("setup") == "batched" and r["encoding"] == "uint8"
                )
                fractions = (0.5,) if quick else (0.5, 0.8, 0.95)
                open_rates = [round(capacity * f, 1) for f in fractions]
                summary["open_loop_capacity"] = capacity
            if setup in ("batched", "previous"):
                for rate in open_rates:
                    r = load_point(server, payloads["uint8"], "open", rate, warmup, duration)
                    log(f"{setup} uint8 open {rate}/s: p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms")
                    rows.append(
                        {
                            "model": main_model,
                            "setup": setup,
                            "encoding": "uint8",
                            "mode": "open",
                            "level": rate,
                            **r,
                        }
                    )
            peak_rss = max(peak_rss, server.peak_rss_mb())
        finally:
            stop_server(server)

    measure_ceiling("after")
    load_samples.append(os.getloadavg()[0])
    summary["load_average_1min"] = {
        "min": min(load_samples),
        "max": max(load_samples),
        "samples": len(load_samples),
    }

    def best(batch: int, key: str) -> float:
        return max(r[key] for r in ceilings if r["batch_size"] == batch)

    def ceiling(batch: int) -> float:
        return max(best(batch, "images_per_s"), best(batch, "xla_images_per_s"))

    best_batch = max(ceiling_sizes, key=ceiling)
    raw_b1_p50 = min(min(r["p50_ms"], r["xla_p50_ms"]) for r in ceilings if r["batch_size"] == 1)
    summary["raw"] = {
        str(b): {
            "plain_images_per_s": best(b, "images_per_s"),
            "xla_images_per_s": best(b, "xla_images_per_s"),
        }
        for b in ceiling_sizes
    }

    def closed(setup: str, model: str = main_model) -> dict[int, dict]:
        return {
            r["level"]: r
            for r in rows
            if r["setup"] == setup
            and r["encoding"] == "uint8"
            and r["mode"] == "closed"
            and r["model"] == model
        }

    served = closed("batched")
    previous = closed("previous")
    per_c = {}
    for c, r in served.items():
        b = min(c, 32)
        entry = {
            "served_images_per_s": r["throughput"],
            "raw_batch": b,
            "raw_plain_images_per_s": best(b, "images_per_s"),
            "raw_xla_images_per_s": best(b, "xla_images_per_s"),
            "served_over_raw": r["throughput"] / ceiling(b),
            "served_over_raw_plain": r["throughput"] / best(b, "images_per_s"),
            "mean_batch": r["mean_batch"],
        }
        if c in previous:
            entry["previous_images_per_s"] = previous[c]["throughput"]
            entry["previous_over_raw_plain"] = previous[c]["throughput"] / best(b, "images_per_s")
        per_c[str(c)] = entry
    summary["per_concurrency"] = per_c
    summary["open_loop"] = [
        {
            "rate": r["level"],
            "setup": r["setup"],
            "p50_ms": r["p50_ms"],
            "p99_ms": r["p99_ms"],
            "throughput": r["throughput"],
        }
        for r in rows
        if r["mode"] == "open"
    ]

    if not quick:
        log("tiny model at concurrency 1 (serving overhead dominates)")
        tiny_dir = work / "serve-tiny"
        tiny_dir.mkdir()
        (tiny_dir / "tiny").symlink_to(models / "tiny")
        tiny_raw = raw_ceiling(models / "tiny" / "1", [1], 3.0)["rows"][0]
        for setup, prefix in (("raw signature", ""), ("raw XLA", "xla_")):
            rows.append(
                {
                    "model": "tiny",
                    "setup": setup,
                    "encoding": "uint8",
                    "mode": "in-process",
                    "level": 1,
                    "throughput": tiny_raw[f"{prefix}images_per_s"],
                    "p50_ms": tiny_raw[f"{prefix}p50_ms"],
                }
            )
        tiny_payload = make_payloads(work, 32)["uint8"]
        tiny = {"raw_p50_ms_b1": tiny_raw["p50_ms"], "raw_xla_p50_ms_b1": tiny_raw["xla_p50_ms"]}
        for setup, flags in (("batched", []), ("previous", setups["previous"][0])):
            server = start_server(tiny_dir, [*flags, *args.server_flags.split()])
            try:
                wait_for_xla(server)
                r = load_point(server, tiny_payload, "closed", 1, warmup, duration)
            finally:
                stop_server(server)
            rows.append(
                {"model": "tiny", "setup": setup, "encoding": "uint8", "mode": "closed", "level": 1, **r}
            )
            key = "" if setup == "batched" else "previous_"
            tiny[f"{key}rps_c1"] = r["throughput"]
            tiny[f"{key}p50_ms_c1"] = r["p50_ms"]
            log(f"tiny {setup} c=1: {r['throughput']:.0f} req/s, p50 {r['p50_ms']:.2f} ms")
        # The measure: served p50 above the signature as exported (plain) at batch 1.
        tiny["overhead_ms"] = tiny["p50_ms_c1"] - tiny["raw_p50_ms_b1"]
        tiny["overhead_vs_xla_ms"] = tiny["p50_ms_c1"] - tiny["raw_xla_p50_ms_b1"]
        tiny["previous_overhead_ms"] = tiny["previous_p50_ms_c1"] - tiny["raw_p50_ms_b1"]
        summary["tiny"] = tiny

    served_best = max(r["throughput"] for r in served.values())
    summary.update(
        model=main_model,
        raw_best_images_per_s=ceiling(best_batch),
        raw_best_batch_size=best_batch,
        served_saturated_rps=served_best,
        efficiency=served_best / ceiling(best_batch),
        overhead_ms=served[1]["p50_ms"] - raw_b1_p50,
        server_peak_rss_mb=peak_rss,
    )
    if "unbatched" in setups:
        high = [c for c in concurrencies if c >= 16]
        b = max(served[c]["throughput"] for c in high)
        u = max(closed("unbatched")[c]["throughput"] for c in high)
        summary["batching_gain"] = b / u
    peers_file = args.out / "peers.json"
    if args.peers and peers_file.exists():
        summary["peers"] = json.loads(peers_file.read_text())
    return {"rows": rows, "summary": summary}


# --------------------------------------------------------------------------- output


COLUMNS = [
    "model",
    "setup",
    "encoding",
    "mode",
    "level",
    "throughput",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_batch",
    "batches_seen",
    "errors",
    "server_cpu_cores",
    "loadgen_cpu_cores",
    "server_peak_rss_mb",
]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value == value else "-"
    return "-" if value is None else str(value)


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = result["rows"], result["summary"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    # Other scripts own other keys of summary.json (bench/interleaved.py's "interleaved"): keep them.
    merge_summary(out / "summary.json", summary)
    # Everything the report is made of, so that --render-docs can redo docs/benchmarks.md (after
    # bench/NOTES.md changed) without measuring again.
    (out / "run.json").write_text(json.dumps(result) + "\n")
    plot(rows, summary, out)


def plot(rows: list[dict], summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = summary["model"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    levels = sorted({r["level"] for r in rows if r["model"] == model and r["mode"] == "closed"})
    raw = summary.get("raw", {})
    for key, label, style in (
        ("plain_images_per_s", "raw signature, batch = min(c, 32)", ":"),
        ("xla_images_per_s", "raw XLA, batch = min(c, 32)", "--"),
    ):
        pts = [(c, raw[str(min(c, 32))][key]) for c in levels if str(min(c, 32)) in raw]
        if pts:
            ax.plot(
                *zip(*pts, strict=True),
                style,
                color="grey" if key.startswith("plain") else "black",
                label=label,
            )
    for setup, encoding, style in (
        ("batched", "uint8", "-o"),
        ("batched", "jpeg", "--s"),
        ("previous", "uint8", "-^"),
        ("unbatched", "uint8", "-v"),
    ):
        pts = [
            (r["level"], r["throughput"])
            for r in rows
            if r["model"] == model
            and r["setup"] == setup
            and r["encoding"] == encoding
            and r["mode"] == "closed"
        ]
        if pts:
            name = {
                "batched": "fovea",
                "previous": "fovea, previous defaults",
                "unbatched": "fovea, max batch 1",
            }
            ax.plot(*zip(*pts, strict=True), style, label=f"{name[setup]}, {encoding}")
    for server, peer_rows in summary.get("peers", {}).get("servers", {}).items():
        pts = [(r["level"], r["throughput"]) for r in peer_rows if r["model"] == model]
        if pts:
            ax.plot(*zip(*pts, strict=True), "-x", label=PEER_NAMES.get(server, server))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent callers (closed loop, one image per request)")
    ax.set_ylabel("images / s")
    ax.set_title(f"{model}: served throughput against the in-process ceiling")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # One series per load shape: closed-loop points in concurrency order, open-loop in rate order.
    # (Sorting both together by throughput would zigzag between them.)
    series = (
        ("batched", "closed", "tab:blue", "o"),
        ("batched", "open", "tab:green", "^"),
        ("previous", "open", "tab:red", "v"),
        ("unbatched", "closed", "tab:orange", "s"),
    )
    for setup, mode, colour, marker in series:
        pts = sorted(
            (r["level"], r["throughput"], r["p50_ms"], r["p99_ms"])
            for r in rows
            if r["model"] == model
            and r["setup"] == setup
            and r["encoding"] == "uint8"
            and r["mode"] == mode
            and r.get("p99_ms") is not None
        )
        if pts:
            _, t, p50, p99 = zip(*pts, strict=True)
            what = "closed loop, rising concurrency" if mode == "closed" else "open loop, rising rate"
            ax.plot(t, p50, f"-{marker}", color=colour, label=f"{setup}, {what}: p50")
            ax.plot(t, p99, f":{marker}", color=colour, alpha=0.6, label=f"{setup}, {what}: p99")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (images / s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{model}: latency percentiles against throughput (uint8)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_throughput.png", dpi=120)
    plt.close(fig)


def print_ratios(summary: dict) -> None:
    print(f"\nKey ratios ({summary['model']}, uint8; targets from issues 6 and 13):")
    print(
        f"  efficiency     {summary['efficiency']:.2f}   (served {summary['served_saturated_rps']:.1f} req/s ÷ raw "
        f"{summary['raw_best_images_per_s']:.1f} img/s at batch {summary['raw_best_batch_size']}; target ≥ 0.90)"
    )
    for c, e in summary["per_concurrency"].items():
        print(
            f"  c={c:<3} served {e['served_images_per_s']:.1f} img/s ÷ raw at batch {e['raw_batch']} "
            f"(best of plain {e['raw_plain_images_per_s']:.1f} and XLA {e['raw_xla_images_per_s']:.1f}) = "
            f"{e['served_over_raw']:.2f} (target ≥ 0.95); mean batch {e['mean_batch']:.1f}"
        )
    if "batching_gain" in summary:
        print(
            f"  batching gain  {summary['batching_gain']:.2f}   (batched ÷ max-batch-1 at concurrency ≥ 16; target ≥ 1.7)"
        )
    print(
        f"  overhead       {summary['overhead_ms']:.2f} ms (served p50 at c=1 - raw p50 at batch 1; target ≤ 2 ms)"
    )
    print(f"  peak RSS       {summary['server_peak_rss_mb']:.0f} MB (server; target ≤ 1600 MB)")
    for point in summary["open_loop"]:
        print(
            f"  open loop {point['rate']}/s {point['setup']}: p50 {point['p50_ms']:.1f} p99 {point['p99_ms']:.1f} ms"
        )
    if "tiny" in summary:
        t = summary["tiny"]
        print(
            f"  tiny model     p50 {t['p50_ms_c1']:.2f} ms at c=1, raw {t['raw_p50_ms_b1']:.2f} ms "
            f"(XLA {t['raw_xla_p50_ms_b1']:.2f}) → overhead {t['overhead_ms']:.2f} ms (target ≤ 0.5; "
            f"previous defaults {t['previous_overhead_ms']:.2f} ms)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds: a harness check")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--seconds", type=float, default=12.0, help="measuring time per load point")
    parser.add_argument(
        "--server-flags",
        default="",
        help="extra `fovea serve` flags for every server, e.g. '--max-in-flight-batches 1'",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="where a full run writes its report",
    )
    parser.add_argument(
        "--no-peers", dest="peers", action="store_false", help="leave out --out/peers.json (bench/peers.py)"
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="a full run without JPEG, max-batch-1 and the odd ceiling sizes (about half the time)",
    )
    parser.add_argument(
        "--render-docs", action="store_true", help="only rewrite --docs from --out/run.json (no measuring)"
    )
    args = parser.parse_args()
    if args.render_docs:
        write_docs(json.loads((args.out / "run.json").read_text()), args.out, args.docs)
        return 0
    result = run(args)
    write_outputs(result, args.out)
    print_ratios(result["summary"])
    if not args.quick:
        write_docs(result, args.out, args.docs)
    print(f"\nresults in {args.out}")
    return 0


def load_note(s: dict) -> str:
    load = s.get("load_average_1min")
    if not load:
        return ""
    note = f"The machine's 1-minute load average during the run: {load['min']:.1f} to {load['max']:.1f}"
    if load["max"] > 2.5:
        note += (
            " (2 cores: other jobs were running and took CPU from the servers; the raw ceiling is the "
            "better of two measurements, so served ÷ raw ratios suffer more than the ceiling does)"
        )
    return note + "."


def write_docs(result: dict, out: Path, docs: Path) -> None:
    s = result["summary"]
    rel = os.path.relpath(out, docs.parent)
    # Hand-written findings (profiles, before/after) survive a re-run of the benchmark.
    notes_file = BENCH / "NOTES.md"
    notes = "\n" + notes_file.read_text() if notes_file.exists() else ""
    per_c = s["per_concurrency"]
    levels = list(per_c)
    peers = s.get("peers", {}).get("servers", {})

    def line(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    table = [
        line("images/s at concurrency", levels),
        "| --- |" + " --- |" * len(levels),
        line(
            "raw signature in-process, batch = concurrency (32 for 64)",
            [f"{per_c[c]['raw_plain_images_per_s']:.1f}" for c in levels],
        ),
        line(
            "raw signature XLA-compiled, same batch",
            [f"{per_c[c]['raw_xla_images_per_s']:.1f}" for c in levels],
        ),
        line("**fovea, defaults**", [f"**{per_c[c]['served_images_per_s']:.1f}**" for c in levels]),
        line(
            "fovea, previous defaults (`--no-xla --batch-formation eager`)",
            [f"{per_c[c].get('previous_images_per_s', float('nan')):.1f}" for c in levels],
        ),
    ]
    for server, peer_rows in peers.items():
        by_level = {str(r["level"]): r["throughput"] for r in peer_rows if r["model"] == s["model"]}
        table.append(
            line(
                PEER_NAMES.get(server, server),
                [f"{by_level[c]:.1f}" if c in by_level else "-" for c in levels],
            )
        )
    table.append(
        line("fovea ÷ the faster raw at that batch", [f"{per_c[c]['served_over_raw']:.2f}" for c in levels])
    )
    table.append(line("fovea mean batch", [f"{per_c[c]['mean_batch']:.1f}" for c in levels]))

    t = s["tiny"]
    tiny_peers = "".join(
        f", {PEER_NAMES.get(server, server).split(' (')[0]} {r['p50_ms']:.2f} ms"
        for server, peer_rows in peers.items()
        for r in peer_rows
        if r["model"] == "tiny"
    )
    opens = {}
    for point in s["open_loop"]:
        opens.setdefault(point["rate"], {})[point["setup"]] = point
    open_lines = [
        "| rate (req/s) | fovea p50 | fovea p99 | previous p50 | previous p99 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rate, by in opens.items():
        new, old = by.get("batched", {}), by.get("previous", {})
        open_lines.append(
            f"| {rate:.1f} ({rate / s['open_loop_capacity']:.0%}) | {new.get('p50_ms', float('nan')):.1f} | "
            f"{new.get('p99_ms', float('nan')):.1f} | {old.get('p50_ms', float('nan')):.1f} | "
            f"{old.get('p99_ms', float('nan')):.1f} |"
        )
    peers_note = (
        f"Peers measured by `python bench/peers.py` on {s['peers']['date']}, each server alone, same load "
        "generator over KServe v2 gRPC."
        if peers
        else "Peers not measured in this run (`python bench/peers.py` first, then this)."
    )
    text = f"""# Benchmarks

Measured by `python bench/run.py` on {s["date"]}.

Machine: {machine()}.

Every request carries one image. The load generator is a separate process using raw grpc.aio stubs;
its CPU use is in the table (`loadgen_cpu_cores`), so you can see it was not the bottleneck.
{load_note(s)}

## Against the model's own speed, and the peers (ResNet50 at 96 px, uint8, closed loop)

{chr(10).join(table)}

{peers_note} The raw rows are the better of a measurement before and one after the servers ran.

Tiny model (three convolutions at 32 px), p50 per call at concurrency 1: fovea {t["p50_ms_c1"]:.2f} ms
(previous defaults {t["previous_p50_ms_c1"]:.2f} ms){tiny_peers}; raw signature {t["raw_p50_ms_b1"]:.2f} ms
(XLA-compiled {t["raw_xla_p50_ms_b1"]:.2f} ms). Per-call overhead over the raw signature:
{t["overhead_ms"]:.2f} ms (previous defaults {t["previous_overhead_ms"]:.2f} ms).

Open loop (Poisson arrivals at fractions of the defaults' closed-loop best, {s["open_loop_capacity"]:.1f} req/s):

{chr(10).join(open_lines)}

Cold start of the defaults: {s["cold_start_s"]:.1f} s from process start to SERVING (plain signature
loaded and warm); the XLA sizes were compiled in the background {s.get("xla_compiled_s", float("nan")):.1f} s
after process start. The server's report: `XLA: {s.get("xla_log", "-").split("XLA: ", 1)[-1]}`

## Key ratios

| ratio | measured | target |
| --- | --- | --- |
| efficiency: served throughput at saturation ÷ raw at the best batch size | {s["efficiency"]:.2f} | ≥ 0.90 |
| batching gain: batched ÷ unbatched throughput at concurrency ≥ 16 | {s.get("batching_gain", float("nan")):.2f} | ≥ 1.7 |
| overhead: served p50 at concurrency 1 - raw p50 at batch 1 | {s["overhead_ms"]:.2f} ms | ≤ 2 ms |
| server peak RSS | {s["server_peak_rss_mb"]:.0f} MB | ≤ 1600 MB |

![throughput]({rel}/throughput_vs_concurrency.png)
![latency]({rel}/latency_vs_throughput.png)

## All points

{(out / "results.md").read_text()}
{notes}"""
    docs.parent.mkdir(parents=True, exist_ok=True)
    # bench/interleaved.py's section of the same page survives this rewrite.
    docs.write_text(keep_sections(docs.read_text(), text) if docs.exists() else text)


if __name__ == "__main__":
    sys.exit(main())
