"""fovea, the peers and the model's own speed in one interleaved run: every comparison on the same machine state.

    python bench/interleaved.py            # ResNet50 at 96 px, every contender, 3 rounds (about 20 minutes)
    python bench/interleaved.py --quick    # tiny model, 1 round, 2 s windows: keeps the harness working
    python bench/interleaved.py --render   # redo the table, plot and docs from --out/interleaved.json
    python bench/interleaved.py --overhead # tiny model, c=1: fovea's p50 over an echo servicer + the raw call

All contenders are up at once: fovea with its defaults (XLA), fovea `--no-xla`, PyTriton serving the
signature as exported, PyTriton serving it XLA-compiled, and MLServer (bench/peers.py starts the peers,
each in its own venv, made on first use). They are loaded one at a time, in short windows in a shuffled
order, by bench/loadgen.py over KServe v2 gRPC (one uint8 image per request, closed loop); within a
round each concurrency is one block whose contenders run back to back, so the servers a ratio compares
are measured seconds apart. The ceiling (the better of the signature and its XLA-compiled form, at
batch min(c, 32), in-process) is one more window of each block, at its shuffled place, while every
server is idle: bench/raw.py --serve keeps the model loaded and compiled in a child process that sits
idle between its windows. On a host whose speed swings by 2-5x within minutes, a ceiling measured
between rounds (as this script did before) is minutes from the windows it divides.

Results are per-round ratios (fovea ÷ ceiling, fovea ÷ the best peer) with their median and range.
Writes interleaved.json (every window), interleaved.md and interleaved.png under --out, merges the key
"interleaved" into its summary.json, and with a full run replaces the interleaved section of
docs/benchmarks.md (the rest of that page is bench/run.py's).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import peers  # noqa: E402  (puts the repository's packages on the path, through run.py)
from fovea.devtools.environment import subprocess_env  # noqa: E402
from report_files import machine, merge_summary, write_section  # noqa: E402
from run import (  # noqa: E402
    batch_histogram,
    make_models,
    make_payloads,
    raw_ceiling,
    run_loadgen,
    start_server,
    stop_server,
    wait_for_xla,
)

SECTION = "interleaved"
# name → (label, how it is started); fovea's flags, or the peer and its kind.
CONTENDERS = {
    "fovea": "fovea, defaults (XLA)",
    "fovea-no-xla": "fovea `--no-xla`",
    "pytriton": "PyTriton, plain signature",
    "pytriton-xla": "PyTriton, XLA-compiled",
    "mlserver": "MLServer",
}
FOVEA_FLAGS = {"fovea": [], "fovea-no-xla": ["--no-xla"]}
PEER_VENVS = {"pytriton": "pytriton", "pytriton-xla": "pytriton", "mlserver": "mlserver"}
MODEL_SIZES = peers.MODEL_SIZES
MAX_BATCH = 32


def log(msg: str) -> None:
    print(f"[interleaved {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Contender:
    name: str
    target: str
    stop: Callable[[], None]
    server: object | None = None  # fovea's Server (its metrics give the batch sizes)
    process: subprocess.Popen | None = None  # a peer's


def wait_answering(contender: Contender, model: str, payload: Path, timeout: float = 1800.0) -> None:
    """Until the peer answers a call (loadgen retries for 300 s each time), or its process has died."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            peers.loadgen(contender.target, model, payload, 1, 0.0, 0.5)
            return
        except subprocess.CalledProcessError as exc:
            assert contender.process is not None
            if contender.process.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"{contender.name} never answered: {exc.stderr[-1500:]}") from None


# --------------------------------------------------------------------------- servers


def start_contenders(
    names: list[str], venvs: Path, work: Path, models: Path, model: str, xla_logs: dict[str, str]
) -> list[Contender]:
    """Every contender up and answering (fovea's XLA report per server into `xla_logs`); on any
    failure the ones already started are stopped."""
    started: list[Contender] = []
    try:
        peer_names = [n for n in names if n in PEER_VENVS]
        for name in peer_names:  # spawned together: they load side by side
            python = peers.ensure_venv(venvs / f"venv-{PEER_VENVS[name]}", peers.PACKAGES[PEER_VENVS[name]])
            paths = {model: models / model / "1"}
            if name == "mlserver":
                process, port = peers.start_mlserver(python, work, paths)
            else:
                process, port = peers.start_pytriton(python, work, paths, xla=name == "pytriton-xla")
            log(f"{name}: starting (its log in {work})")
            started.append(
                Contender(name, f"127.0.0.1:{port}", lambda p=process: peers.stop(p), process=process)
            )
        payload = make_payloads(work, MODEL_SIZES[model])["uint8"]
        for contender in started:
            # Peers have no readiness of their own here: the first answered call is the sign
            # (PyTriton's XLA kind compiles every batch size before its port opens). fovea starts
            # only then: it times its XLA sizes at start-up, which must not run beside a compiler.
            wait_answering(contender, model, payload)
            log(f"{contender.name}: answering on {contender.target}")
        model_dir = work / f"serve-{model}"
        model_dir.mkdir(exist_ok=True)
        if not (model_dir / model).exists():
            (model_dir / model).symlink_to(models / model)
        for name in (n for n in names if n in FOVEA_FLAGS):
            server = start_server(model_dir, FOVEA_FLAGS[name])
            started.append(Contender(name, server.target, lambda s=server: stop_server(s), server))
            xla = wait_for_xla(server)  # one at a time, for the same reason
            if xla:
                xla_logs[name] = xla.split("XLA: ", 1)[-1]
            log(f"{name}: serving on {server.target}" + (f"; {xla.split('XLA: ', 1)[-1]}" if xla else ""))
        return started
    except BaseException:
        for contender in started:
            contender.stop()
        raise


# --------------------------------------------------------------------------- measuring


CEILING = "ceiling"


class Ceiling:
    """The model in-process, measured on demand (bench/raw.py --serve): loaded and compiled once,
    idle between its windows, so it takes no CPU from the servers' windows."""

    name = CEILING

    def __init__(self, version: Path, batches: list[int]) -> None:
        argv = [sys.executable, str(BENCH / "raw.py"), "--model", str(version), "--serve"]
        argv += ["--batch-sizes", ",".join(map(str, batches))]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env()
        )
        if not self.process.stdout.readline():
            raise RuntimeError(f"bench/raw.py --serve ended before it was ready (exit {self.process.wait()})")

    def measure(self, batch: int, seconds: float) -> dict:
        """img/s of the faster of the plain and the XLA-compiled call, `seconds` each, alternating."""
        self.process.stdin.write(f"{batch} {seconds}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench/raw.py --serve ended (exit {self.process.wait()})")
        row = json.loads(line)
        return {**row, "throughput": max(row["images_per_s"], row.get("xla_images_per_s", 0.0))}

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def cpu_steal() -> tuple[int, int]:
    """(steal, all) jiffies of the whole machine from /proc/stat: the time a virtual machine's host
    took its CPUs away. (0, 0) where there is no /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return 0, 0
    values = [int(v) for v in first]
    return (values[7] if len(values) > 7 else 0), sum(values)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def describe(r: dict) -> str:
    """One window's log line after its round, level and contender."""
    if "batch_size" in r:  # a ceiling window
        line = f"{r['throughput']:7.1f} img/s (batch {r['batch_size']}, plain {r['images_per_s']:.1f}"
        line += f", XLA {r['xla_images_per_s']:.1f})" if "xla_images_per_s" in r else ")"
    else:
        line = f"{r['throughput']:7.1f} img/s p50 {r['p50_ms'] or float('nan'):7.1f} ms, errors {r['errors']}"
        line += f", mean batch {r['mean_batch']:.1f}" if "mean_batch" in r else ""
    return line + f", steal {r['steal_share']:.0%}"


def window(contender: Contender, model: str, payload: Path, c: int, warmup: float, seconds: float) -> dict:
    before = contender.server.metrics() if contender.server else None
    r = peers.loadgen(contender.target, model, payload, c, warmup, seconds)
    if contender.server:
        r["mean_batch"], r["batches_seen"] = batch_histogram(before, contender.server.metrics())
    return r


def measure(args: argparse.Namespace, work: Path) -> dict:
    model = "tiny" if args.quick else "resnet50"
    models = work / "models"
    log(f"exporting {model} with the trainer's export code")
    make_models(models, [model])
    payload = make_payloads(work, MODEL_SIZES[model])["uint8"]
    names = args.contenders.split(",")
    if args.quick and args.contenders == ",".join(CONTENDERS):
        # Quick: fovea, plus whichever peer's venv already exists (CI has none; no installing).
        names = ["fovea"] + [
            n
            for n in PEER_VENVS
            if peers.ready_venv(args.venvs / f"venv-{PEER_VENVS[n]}", peers.PACKAGES[PEER_VENVS[n]])
        ]
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    batches = sorted({min(c, MAX_BATCH) for c in levels})
    rng = random.Random(args.seed)
    began = time.monotonic()
    result: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "model": model,
        "image_size": MODEL_SIZES[model],
        "contenders": names,
        "levels": levels,
        "rounds": args.rounds,
        "window_s": args.seconds,
        "warmup_s": args.warmup,
        "ceiling_s": args.ceiling_seconds,
        "machine": machine(),
        "windows": [],
        "load_average_1min": [],
    }
    result["fovea_xla"] = {}
    contenders = start_contenders(names, args.venvs, work, models, model, result["fovea_xla"])
    ceiling: Ceiling | None = None
    try:
        ceiling = Ceiling(models / model / "1", batches)
        result["startup_s"] = time.monotonic() - began
        for round_ in range(args.rounds):
            order = rng.sample(levels, len(levels))
            for c in order:
                for contender in rng.sample([*contenders, ceiling], len(contenders) + 1):
                    steal = cpu_steal()
                    if contender is ceiling:
                        r = ceiling.measure(min(c, MAX_BATCH), args.ceiling_seconds)
                    else:
                        r = window(contender, model, payload, c, args.warmup, args.seconds)
                    r["steal_share"] = steal_share(steal, cpu_steal())
                    load = os.getloadavg()[0]
                    result["load_average_1min"].append(load)
                    result["windows"].append(
                        {"round": round_, "contender": contender.name, "level": c, "load_1min": load, **r}
                    )
                    log(f"round {round_ + 1} c={c:<2} {contender.name:<13} {describe(r)}")
    finally:
        if ceiling is not None:
            ceiling.stop()
        for contender in contenders:
            contender.stop()
    result["took_s"] = time.monotonic() - began
    return result


# --------------------------------------------------------------------------- per-call overhead


OVERHEAD_PARTS = ("fovea", "echo", "raw")


def start_echo() -> tuple[subprocess.Popen, str]:
    """bench/overhead.py's grpc.aio echo ClassifierService in its own process; it and its target."""
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "overhead.py"), "--echo-server"],
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, f"127.0.0.1:{int(process.stdout.readline())}"


def stop_echo(process: subprocess.Popen) -> None:
    assert process.stdin is not None
    process.stdin.close()  # its cue to stop
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure_overhead(args: argparse.Namespace, work: Path) -> dict:
    """Tiny model at concurrency 1, interleaved: fovea's p50 (fovea.v1 Predict), a bare grpc.aio echo
    servicer's p50 (same request, same load generator) and the raw model call at batch 1 (the faster
    of the signature and its XLA form, in a child process), in a shuffled order each round."""
    models = work / "models"
    log("exporting tiny with the trainer's export code")
    make_models(models, ["tiny"])
    payload = make_payloads(work, MODEL_SIZES["tiny"])["uint8"]
    model_dir = work / "serve-tiny"
    model_dir.mkdir()
    (model_dir / "tiny").symlink_to(models / "tiny")
    rng = random.Random(args.seed)
    began = time.monotonic()
    result: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "window_s": args.seconds,
        "warmup_s": args.warmup,
        "machine": machine(),
        "windows": [],
    }
    server = start_server(model_dir, [])
    try:
        log(f"fovea: XLA: {wait_for_xla(server).split('XLA: ', 1)[-1]}")
        echo, echo_target = start_echo()
        try:
            for round_ in range(args.rounds):
                for part in rng.sample(OVERHEAD_PARTS, len(OVERHEAD_PARTS)):
                    if part == "raw":
                        row = raw_ceiling(models / "tiny" / "1", [1], args.seconds)["rows"][0]
                        p50 = min(row["p50_ms"], row["xla_p50_ms"])
                    else:
                        target = server.target if part == "fovea" else echo_target
                        r = run_loadgen(
                            target, payload, "--concurrency", "1",
                            "--warmup", str(args.warmup), "--duration", str(args.seconds),
                        )  # fmt: skip
                        p50 = r["p50_ms"]
                    load = os.getloadavg()[0]
                    result["windows"].append(
                        {"round": round_, "part": part, "p50_ms": p50, "load_1min": load}
                    )
                    log(f"round {round_ + 1} {part:<5} p50 {p50:.3f} ms")
        finally:
            stop_echo(echo)
    finally:
        stop_server(server)
    result["took_s"] = time.monotonic() - began
    return result


def summarize_overhead(result: dict) -> dict:
    """summary.json's tiny.over_echo_ms (median over rounds of fovea - echo - raw, in ms) and its detail."""
    p50 = {
        part: [
            next(w["p50_ms"] for w in result["windows"] if w["round"] == r and w["part"] == part)
            for r in range(result["rounds"])
        ]
        for part in OVERHEAD_PARTS
    }
    over = [f - e - m for f, e, m in zip(p50["fovea"], p50["echo"], p50["raw"], strict=True)]
    loads = [w["load_1min"] for w in result["windows"]]
    return {
        "over_echo_ms": statistics.median(over),
        "over_echo": {
            "date": result["date"],
            "rounds": result["rounds"],
            "window_s": result["window_s"],
            "per_round_ms": spread(over),
            "p50_ms": {part: spread(v) for part, v in p50.items()},
            "load_average_1min": {"min": min(loads), "max": max(loads)},
        },
    }


def overhead_section(result: dict, tiny: dict) -> str:
    o = tiny["over_echo"]
    cells = " | ".join(_range(o["p50_ms"][part], ".3f") for part in OVERHEAD_PARTS)
    load = o["load_average_1min"]
    return f"""## Per-call overhead, interleaved (tiny model, concurrency 1)

Measured by `python bench/interleaved.py --overhead` on {result["date"]}: {result["rounds"]} rounds, each
a shuffled order of fovea (defaults, fovea.v1 Predict), a bare grpc.aio echo ClassifierService (the same
request, answered at once, `bench/overhead.py --echo-server`) and the raw model call at batch 1 (the
faster of the signature and its XLA form, in-process in a child); {result["window_s"]:g} s each, p50 in ms,
median of the rounds (range). 1-minute load average {load["min"]:.1f} to {load["max"]:.1f} (a shared host).

| fovea | echo | raw call | fovea - (echo + raw call), per round |
| --- | --- | --- | --- |
| {cells} | {_range(o["per_round_ms"], ".3f")} |
"""


def run_overhead(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fovea-overhead-") as tmp:
        result = measure_overhead(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "interleaved_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    tiny = summarize_overhead(result)
    merge_summary(args.out / "summary.json", {"tiny": tiny})
    if not (args.quick or args.no_docs):
        write_section(args.docs, "interleaved-overhead", overhead_section(result, tiny))
    o = tiny["over_echo"]
    print(
        "p50 ms, median (range): "
        + ", ".join(f"{part} {_range(o['p50_ms'][part], '.3f')}" for part in OVERHEAD_PARTS)
        + f"; fovea - (echo + raw) {_range(o['per_round_ms'], '.3f')} ms"
    )


# --------------------------------------------------------------------------- results


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def summarize(result: dict) -> dict:
    """The "interleaved" key of summary.json: per concurrency, medians over the rounds and the median
    and range of the per-round ratios."""
    names, rounds = result["contenders"], result["rounds"]
    out: dict = {
        "date": result["date"],
        "quick": result["quick"],
        "model": f"{result['model']} at {result['image_size']} px, uint8, one image per request",
        "rounds": rounds,
        "window_s": result["window_s"],
        "warmup_s": result["warmup_s"],
        "took_s": round(result["took_s"], 1),
        "load_average_1min": {
            "min": min(result["load_average_1min"]),
            "max": max(result["load_average_1min"]),
        },
    }
    steal = [w["steal_share"] for w in result["windows"] if "steal_share" in w]
    if steal:  # the share of CPU time the virtual machine's host took away, per window
        out["steal_share"] = {"min": min(steal), "max": max(steal)}
    for c in result["levels"]:
        ceilings = round_ceilings(result, c)
        speed = {n: speeds(result, n, c) for n in names}
        errors = {
            n: sum(w["errors"] for w in result["windows"] if w["contender"] == n and w["level"] == c)
            for n in names
        }
        peer_names = [n for n in names if n in PEER_VENVS]
        entry: dict = {"ceiling_batch": min(c, MAX_BATCH), "ceiling": statistics.median(ceilings)}
        for n in (x for x in names if x in FOVEA_FLAGS):
            key = n.replace("-", "_")
            entry[key] = statistics.median(speed[n])
            entry[f"{key}_over_ceiling"] = spread([s / k for s, k in zip(speed[n], ceilings, strict=True)])
        entry["peers"] = {n: statistics.median(speed[n]) for n in peer_names}
        if "fovea" in names:
            entry["over_ceiling"] = entry.pop("fovea_over_ceiling")
            if peer_names:
                entry["over_best_peer"] = over_best_peer(speed["fovea"], [speed[n] for n in peer_names])
            if "steal_share" in out and "ceilings" not in result:
                # The host took 0.1-41% of the CPU from one window to the next (seconds apart, one run
                # of 2026-12-03): the same ratios per CPU left, a rough correction for CPU-bound work.
                per_cpu = {n: speeds(result, n, c, per_cpu=True) for n in ["fovea", CEILING, *peer_names]}
                entry["over_ceiling_per_cpu"] = spread(
                    [f / k for f, k in zip(per_cpu["fovea"], per_cpu[CEILING], strict=True)]
                )
                if peer_names:
                    entry["over_best_peer_per_cpu"] = over_best_peer(
                        per_cpu["fovea"], [per_cpu[n] for n in peer_names]
                    )
        entry["errors"] = errors
        fovea_batches = [
            w["mean_batch"] for w in result["windows"] if _is(w, None, "fovea", c) and "mean_batch" in w
        ]
        if fovea_batches:
            entry["fovea_mean_batch"] = statistics.median(fovea_batches)
        out[str(c)] = entry
    return out


def over_best_peer(fovea: list[float], peers: list[list[float]]) -> dict:
    """Per round, fovea over the fastest peer of that round; their median and range."""
    return spread([f / max(p[r] for p in peers) for r, f in enumerate(fovea)])


def round_ceilings(result: dict, c: int) -> list[float]:
    """Per round, the ceiling at concurrency c: its window in the round's block. Runs recorded before
    the ceiling was a window (a list of "ceilings" measured between rounds) use the better of the
    measurements just before and after the round."""
    if "ceilings" not in result:
        return speeds(result, CEILING, c)
    b = str(min(c, MAX_BATCH))
    return [max(result["ceilings"][r][b], result["ceilings"][r + 1][b]) for r in range(result["rounds"])]


def speeds(result: dict, name: str, c: int, per_cpu: bool = False) -> list[float]:
    """Per round, the contender's img/s at concurrency c; `per_cpu`: per share of the CPU the
    virtual machine's host left it in that window (img/s ÷ (1 - steal share))."""
    return [
        next(
            w["throughput"] / (1.0 - w["steal_share"] if per_cpu else 1.0)
            for w in result["windows"]
            if _is(w, r, name, c)
        )
        for r in range(result["rounds"])
    ]


def _is(w: dict, round_: int | None, name: str, c: int) -> bool:
    return w["contender"] == name and w["level"] == c and (round_ is None or w["round"] == round_)


def _range(s: dict, fmt: str = ".2f") -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def table(result: dict, summary: dict) -> str:
    names = result["contenders"]
    head = ["concurrency", *(CONTENDERS[n] for n in names), f"ceiling (batch min(c, {MAX_BATCH}))"]
    if "over_ceiling" in summary[str(result["levels"][0])]:
        head.append("fovea ÷ ceiling")
    if "over_best_peer" in summary[str(result["levels"][0])]:
        head.append("fovea ÷ best peer")
    per_cpu = [
        k
        for k in ("over_ceiling_per_cpu", "over_best_peer_per_cpu")
        if k in summary[str(result["levels"][0])]
    ]
    head += [
        {
            "over_ceiling_per_cpu": "÷ ceiling, per CPU left",
            "over_best_peer_per_cpu": "÷ best peer, per CPU left",
        }[k]
        for k in per_cpu
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in result["levels"]:
        e = summary[str(c)]
        cells = [str(c)]
        for values in [*(speeds(result, n, c) for n in names), round_ceilings(result, c)]:
            cells.append(_range(spread(values), ".1f"))
        if "over_ceiling" in e:
            cells.append(_range(e["over_ceiling"]))
        if "over_best_peer" in e:
            cells.append(_range(e["over_best_peer"]))
        cells += [_range(e[k]) for k in per_cpu]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))

    def series(values: list[list[float]], label: str, style: str, **kw) -> None:
        med = [statistics.median(v) for v in values]
        err = [
            [m - min(v) for m, v in zip(med, values, strict=True)],
            [max(v) - m for m, v in zip(med, values, strict=True)],
        ]
        ax.errorbar(levels, med, yerr=err, fmt=style, capsize=3, label=label, **kw)

    rounds = result["rounds"]
    series(
        [round_ceilings(result, c) for c in levels],
        f"ceiling: in-process, batch min(c, {MAX_BATCH}), plain or XLA",
        "--",
        color="black",
    )
    for n in result["contenders"]:
        series(
            [speeds(result, n, c) for c in levels],
            CONTENDERS[n].replace("`", ""),
            "-o" if n.startswith("fovea") else "-x",
            lw=2.2 if n == "fovea" else 1.2,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent callers (closed loop, one image per request, KServe v2 gRPC)")
    ax.set_ylabel("images / s (median of rounds; bars: range)")
    ax.set_title(
        f"{summary['model'].split(',')[0]}: interleaved, {rounds} round(s) of {result['window_s']:g} s windows"
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "interleaved.png", dpi=120)
    plt.close(fig)


def docs_section(result: dict, summary: dict, out: Path, docs: Path) -> str:
    rel = os.path.relpath(out, docs.parent)
    load = summary["load_average_1min"]
    swing = ", ".join(
        f"{min(v):.0f}-{max(v):.0f} at batch {min(c, MAX_BATCH)}"
        for c in result["levels"]
        for v in [round_ceilings(result, c)]
    )
    steal = summary.get("steal_share")
    shared = (
        f"1-minute load average {load['min']:.1f} to {load['max']:.1f} on 2 cores (sampled after every "
        "window)"
        + (f", CPU steal {steal['min']:.0%} to {steal['max']:.0%} of a window" if steal else "")
        + f". The ceiling itself moved over the run ({swing} img/s): the host's speed changes within "
        "minutes, which is why every ratio pairs windows of the same block."
        + (
            ' Where the host took CPU away, the columns "per CPU left" divide each window\'s img/s by '
            "(1 - its steal share) first: a rough correction for CPU-bound work, shown beside the plain "
            "ratios, never instead of them."
            if steal
            else ""
        )
    )
    return f"""## Interleaved: fovea, the peers and the ceiling in one run ({summary["model"]})

Measured by `python bench/interleaved.py` on {result["date"]} ({result["took_s"] / 60:.0f} minutes
including start-up). Machine: {result["machine"]}.

Every contender was up at once; they were loaded one at a time, in shuffled
{result["window_s"]:g}-second windows (after {result["warmup_s"]:g} s of warm-up), over
{result["rounds"]} rounds, each round a shuffled order of the concurrencies with the contenders in a
shuffled order within each, all driven by `bench/loadgen.py` over KServe v2 gRPC (closed loop). The
ceiling (the model in-process, the better of its signature and the XLA-compiled signature, at batch
min(c, {MAX_BATCH})) {_ceiling_how(result)} **The ratios are interleaved:** medians (and ranges) of
per-round ratios; fovea ÷ best peer and fovea ÷ ceiling compare windows of the same concurrency block
({len(result["contenders"]) + ("ceilings" not in result)} windows back to back).
{shared}{_xla_note(result)}

Images/s, median of the rounds (range in brackets):

{table(result, summary)}
PyTriton runs Triton's dynamic batcher with no queue delay, max batch {MAX_BATCH}; its XLA kind is
`tf.function(jit_compile=True)` around the loaded signature, compiled before it serves for batch
sizes 1, 2, 4, ... {MAX_BATCH}, each batch padded to the next of them (as fovea serves XLA). MLServer uses adaptive batching (max batch {MAX_BATCH}, 2 ms). fovea runs its
defaults. Errors (any non-OK answer) over the whole run: {_errors(summary, result)}.

![interleaved]({rel}/interleaved.png)
"""


def _ceiling_how(result: dict) -> str:
    if "ceilings" in result:  # a run recorded before the ceiling was a window
        return (
            "was measured in a child process between rounds while every server was idle; a round's "
            "ceiling is the better of the measurements before and after it."
        )
    return (
        "was one more window of each block, at its shuffled place, while every server was idle "
        f"({result.get('ceiling_s', 2.0):g} s for each of the two calls, alternating; bench/raw.py "
        "--serve keeps the model loaded and compiled in a child process, idle between its windows)."
    )


def _xla_note(result: dict) -> str:
    # fovea picks its XLA sizes by timing each once at start-up: on a busy host that pick is noisy.
    logs = result.get("fovea_xla", {})
    return "".join(
        f"\n\n{n} at start-up (one timed call per size): `XLA: {line}`" for n, line in logs.items()
    )


def _errors(summary: dict, result: dict) -> str:
    total = {n: sum(summary[str(c)]["errors"][n] for c in result["levels"]) for n in result["contenders"]}
    return ", ".join(f"{n} {v}" for n, v in total.items())


def write_outputs(result: dict, out: Path, docs: Path | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    (out / "interleaved.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "interleaved.md").write_text(table(result, summary))
    plot(result, summary, out)
    merge_summary(out / "summary.json", {SECTION: summary})
    if docs is not None:
        write_section(docs, SECTION, docs_section(result, summary, out, docs))
    return summary


def print_summary(summary: dict, levels: list[int]) -> None:
    for c in levels:
        e = summary[str(c)]
        line = f"c={c:<3} fovea {e.get('fovea', float('nan')):7.1f} img/s, ceiling {e['ceiling']:7.1f}"
        if "over_ceiling" in e:
            line += f", ÷ ceiling {_range(e['over_ceiling'])}"
        if "over_best_peer" in e:
            line += f", ÷ best peer {_range(e['over_best_peer'])}"
        print(line + "  peers: " + ", ".join(f"{n} {v:.1f}" for n, v in e["peers"].items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round, 2 s windows")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--rounds", type=int, help="default 3 (quick: 1)")
    parser.add_argument("--seconds", type=float, help="measuring time per window; default 6 (quick: 2)")
    parser.add_argument("--warmup", type=float, help="warm-up per window; default 2 (quick: 0.5)")
    parser.add_argument("--ceiling-seconds", type=float, help="per window and kind; default 3 (quick: 1)")
    parser.add_argument("--seed", type=int, default=0, help="of the shuffled order")
    parser.add_argument("--venvs", type=Path, default=Path("/work"), help="where venv-<peer> live")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="leave --docs alone (quick runs always do)")
    parser.add_argument(
        "--render", action="store_true", help="only redo the outputs from --out/interleaved.json"
    )
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="instead: the tiny model's p50 at concurrency 1 over an echo servicer plus the raw call"
        " (default 5 rounds of 3 s)",
    )
    args = parser.parse_args()
    # A stopped run still stops every server it started (the finally blocks), peers included.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quick_defaults = {
        "rounds": (5, 1) if args.overhead else (3, 1),
        "seconds": (3.0, 1.0) if args.overhead else (6.0, 2.0),
        "warmup": (1.0, 0.5) if args.overhead else (2.0, 0.5),
        "ceiling_seconds": (3.0, 1.0),
    }
    for key, (full, quick) in quick_defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.overhead:
        run_overhead(args)
        return 0
    if args.render:
        result = json.loads((args.out / "interleaved.json").read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="fovea-interleaved-") as tmp:
            result = measure(args, Path(tmp))
    docs = None if result["quick"] or args.no_docs else args.docs
    summary = write_outputs(result, args.out, docs)
    print_summary(summary, result["levels"])
    log(f"took {result['took_s']:.0f} s; results in {args.out}" + (f", {docs}" if docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
