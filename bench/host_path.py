"""The host path at GPU speed: requests per second per server core with a model that costs nothing.

    python bench/host_path.py            # fovea and PyTriton, 3 rounds, py-spy breakdown (about 5 minutes)
    python bench/host_path.py --quick    # 1 round of short windows; peers and py-spy only if installed
    python bench/host_path.py --render   # redo summary.json's key and the docs section from host_path.json

A null model (bench/make_models.py's `null`: it reads one pixel per image and answers a constant
softmax) at 96 and 224 px, published with the trainer's export code, so that what is measured is the
server's own path: the transport, parsing, decoding, batching and answering. It is served by fovea
(defaults) and by PyTriton (bench/peers.py's server: Triton's dynamic batcher, no queue delay, max
batch 32; the bytes model calls the version's bytes signature, which decodes in the graph with the
ops fovea decodes with), both up at once, loaded one at a time by bench/loadgen.py (closed loop,
concurrency 64, one image per request) in short windows in a shuffled order, over several rounds (the
bench's interleaved method, see bench/interleaved.py). Cases: fovea.v1 Predict and KServe v2
ModelInfer, each with uint8 pixels at 96 px and with a JPEG at 224 px (KServe v2: BYTES; PyTriton
speaks only KServe v2, so both fovea cases of a payload compare with its one window of that payload).

Requests per second per server core: requests/s divided by the CPU the server's process tree used
over the window, in cores (utime + stime of every process and thread, bench/proc_cpu.py; PyTriton's
tree holds Triton's C++ server and its Python model process). The per-round ratios fovea ÷ PyTriton
have their median and range. Then fovea alone is sampled with py-spy at concurrency 64 for each
case, and the samples grouped into a few buckets, in microseconds of CPU per request.

Writes host_path.json under --out, merges the key "host_path" into its summary.json and, with a
full run, replaces the host-path section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import peers  # noqa: E402  (puts the repository's packages on the path, through run.py)
import proc_cpu  # noqa: E402
from fovea.devtools import prom_text  # noqa: E402
from interleaved import Contender, spread, wait_answering  # noqa: E402
from report_files import machine, merge_summary, write_section  # noqa: E402
from run import (  # noqa: E402
    Server,
    batch_histogram,
    make_models,
    make_payloads,
    run_loadgen,
    start_server,
    stop_server,
)

SECTION = "host-path"
CONCURRENCY = 64
MAX_BATCH = 32  # fovea's default --max-batch-size; PyTriton's is set to the same
PY_SPY = ["py-spy==0.4.3"]


@dataclass(frozen=True)
class Payload:
    name: str
    size: int
    model: str  # the null model's name, for fovea.v1
    v2_model: str  # its KServe v2 name (fovea's and PyTriton's)


PAYLOADS = {
    "uint8-96": Payload("uint8 pixels, 96 px", 96, "null96", "null96"),
    "jpeg-224": Payload("JPEG, 224 px", 224, "null224", "null224-encoded"),
}
PROTOCOLS = {"fovea.v1": "fovea", "kserve-v2": "kserve"}  # name → loadgen's --protocol
# (server, protocol) pairs measured for each payload: PyTriton speaks KServe v2 only.
CONTENDERS = [("fovea", "fovea.v1"), ("fovea", "kserve-v2"), ("pytriton", "kserve-v2")]
# Where py-spy's samples go: the first frame from the leaf up that one of these names decides.
# (bucket, a piece of the frame's file or library, the functions it covers or None for all of them).
BUCKETS = ("grpc/protobuf", "decode", "batcher/asyncio", "model call", "metrics/logging", "other")
# Threads py-spy cannot see (no Python runs on them), charged from /proc by their names.
TF_THREADS = "TensorFlow's threads"  # its executors and Eigen pools: the decode or the model's ops
NATIVE = {"tf_": TF_THREADS, "event_engine": "grpc/protobuf", "grpc": "grpc/protobuf"}
# A sample whose last frames wait (for a lock, a condition, a queue, the poller) is idle: with
# --native, py-spy counts some of those as busy.
IDLE = frozenset(
    {
        "epoll_wait", "epoll_pwait", "poll", "select", "pthread_cond_wait", "pthread_cond_timedwait",
        "pthread_cond_clockwait", "sem_wait", "sem_timedwait", "sem_clockwait", "nanosleep",
        "clock_nanosleep", "PyThread_acquire_lock_timed", "take_gil", "accept", "accept4",
    }
)  # fmt: skip
RULES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("decode", "fovea/server/loader.py", frozenset({"decode", "resize", "_resize"})),
    ("model call", "fovea/server/loader.py", None),
    ("decode", "fovea/server/servable.py", frozenset({"_prepare", "_timed_prepare", "preprocess"})),
    ("decode", "fovea/server/imageinfo.py", None),
    ("decode", "fovea/server/core.py", frozenset({"_check_encoded", "_preprocess"})),
    ("metrics/logging", "prometheus_client", None),
    ("metrics/logging", "logging/", None),
    ("metrics/logging", "fovea/server/metrics.py", None),
    ("metrics/logging", "fovea/server/logs.py", None),
    ("metrics/logging", "fovea/server/tracing.py", None),
    ("metrics/logging", "fovea/server/calls.py", None),
    ("grpc/protobuf", "grpc", None),  # grpc's Python and Cython, its C core, fovea's v2_grpc.py
    ("grpc/protobuf", "protobuf", None),
    ("grpc/protobuf", "_upb", None),
    ("grpc/protobuf", "_message.abi3", None),  # protobuf's upb extension, as a native frame
    ("grpc/protobuf", "fovea/server/servicer.py", None),
    ("grpc/protobuf", "fovea/server/rpc.py", None),
    ("grpc/protobuf", "fovea/v1/", None),
    ("grpc/protobuf", "fovea/inference/", None),
    ("batcher/asyncio", "asyncio", None),
    ("batcher/asyncio", "selectors.py", None),
    ("batcher/asyncio", "concurrent/futures", None),
    ("batcher/asyncio", "threading.py", None),
    ("batcher/asyncio", "fovea/server/batcher.py", None),
    ("batcher/asyncio", "fovea/server/batch_costs.py", None),
    ("batcher/asyncio", "fovea/server/batch_formation.py", None),
    ("batcher/asyncio", "fovea/server/lease.py", None),
    ("other", "fovea/", None),
)
# MLCommons, MLPerf Inference v4.1, closed division, datacenter, NVIDIA's H200-SXM-141GBx8_TRT
# system, ResNet50 Offline: 756,960 samples/s for 8 GPUs (results repository
# inference_results_v4.1, closed/NVIDIA/results/H200-SXM-141GBx8_TRT/resnet50/Offline/
# performance/run_1/mlperf_log_summary.txt). Published, not measured here.
H200_SYSTEM_SAMPLES_PER_S = 756_960
H200_GPUS = 8


def log(msg: str) -> None:
    print(f"[host-path {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def photo_jpeg(folder: Path, size: int) -> Path:
    """A JPEG at quality 90 shaped like a photo rather than noise (smooth colour fields and mild
    grain), so decoding costs what a real 224 px image costs; random pixels would take 3-4x the bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    fields = [
        128 + 100 * np.sin(6 * x + 3 * y),
        128 + 90 * np.cos(5 * y - 8 * x * y),
        128 + 80 * np.sin(9 * x * y + 1),
    ]
    pixels = np.stack(fields, -1) + rng.normal(0, 10, (size, size, 3))
    path = folder / f"photo{size}.jpg"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


# --------------------------------------------------------------------------- servers


@dataclass
class Servers:
    fovea: Server
    pytriton: subprocess.Popen | None
    pytriton_target: str | None

    def target(self, server: str) -> str:
        if server == "fovea":
            return self.fovea.target
        assert self.pytriton_target is not None
        return self.pytriton_target

    def pid(self, server: str) -> int:
        process = self.fovea.process if server == "fovea" else self.pytriton
        assert process is not None
        return process.pid

    def stop(self) -> None:
        if self.pytriton is not None:
            peers.stop(self.pytriton)
        stop_server(self.fovea)


def wait_xla(server, models: int, timeout: float = 600.0) -> list[str]:
    """Until the server has reported its XLA compile for every model (none to wait for with
    --no-xla), so that no window runs beside the compiler; those log lines."""
    if "--no-xla" in server.argv:
        return []
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        lines = [line for line in server.output if "XLA: compiled" in line or "XLA compile failed" in line]
        if len(lines) >= models:
            return [line.split("XLA", 1)[-1] for line in lines]
        time.sleep(0.2)
    raise RuntimeError("the server did not report its XLA compile in time")


def start_servers(
    models: Path, payloads: dict[str, Path], with_pytriton: bool, venvs: Path, flags: list[str], work: Path
) -> tuple[Servers, list[str]]:
    pytriton = target = None
    if with_pytriton:
        python = peers.ensure_venv(venvs / "venv-pytriton", peers.PACKAGES["pytriton"])
        paths = {p.v2_model: models / p.model / "1" for p in PAYLOADS.values()}
        pytriton, port = peers.start_pytriton(python, work, paths)
        target = f"127.0.0.1:{port}"
        log(f"pytriton: starting (its log in {work})")
        try:
            peer = Contender("pytriton", target, lambda: None, process=pytriton)
            wait_answering(peer, "null96", payloads["uint8-96"])
        except BaseException:
            peers.stop(pytriton)
            raise
        log(f"pytriton: answering on {target}")
    try:
        fovea = start_server(models, flags)
    except BaseException:
        if pytriton is not None:
            peers.stop(pytriton)
        raise
    servers = Servers(fovea, pytriton, target)
    try:
        xla = wait_xla(fovea, len(PAYLOADS))
    except BaseException:
        servers.stop()
        raise
    log(f"fovea: serving on {fovea.target}" + "".join(f"; XLA{line}" for line in xla))
    return servers, xla


# --------------------------------------------------------------------------- measuring


def window(servers: Servers, server: str, protocol: str, payload: str, path: Path, args) -> dict:
    p = PAYLOADS[payload]
    model = p.model if protocol == "fovea.v1" else p.v2_model
    before = servers.fovea.metrics() if server == "fovea" else None
    r = run_loadgen(
        servers.target(server), path, "--protocol", PROTOCOLS[protocol], "--model", model,
        "--concurrency", str(args.concurrency), "--warmup", str(args.warmup), "--duration", str(args.seconds),
        "--cpu-of", str(servers.pid(server)),
    )  # fmt: skip
    if before is not None:
        r["mean_batch"], r["batches_seen"] = batch_histogram(before, servers.fovea.metrics())
    r["per_core"] = r["throughput"] / r["server_cores"] if r["server_cores"] > 0 else 0.0
    return r


def requests_ok(server) -> float:
    return prom_text.total(server.metrics(), "fovea_requests_total", code="OK")


def ensure_py_spy(args) -> Path | None:
    """py-spy's binary (a venv of its own, made on first use, not a project dependency); None, with
    the reason printed, when it cannot be had (a quick run installs nothing)."""
    if args.py_spy:
        return Path(args.py_spy)
    venv = args.venvs / "venv-pyspy"
    ready = peers.ready_venv(venv, PY_SPY)
    if ready is None and not args.quick:
        peers.ensure_venv(venv, PY_SPY)
    binary = venv / "bin" / "py-spy"
    if binary.exists():
        return binary
    found = shutil.which("py-spy")
    if found:
        return Path(found)
    log(f"no py-spy ({venv} is not made and none is on PATH): skipping the CPU breakdown")
    return None


def profile(
    servers: Servers, py_spy: Path, protocol: str, payload: str, path: Path, args, work: Path
) -> dict:
    """fovea at concurrency 64 under py-spy for --profile-seconds: the samples by bucket, the
    requests answered and the CPU the process used meanwhile (from its own counters and /proc)."""
    p = PAYLOADS[payload]
    model = p.model if protocol == "fovea.v1" else p.v2_model
    fovea = servers.fovea
    argv = [
        sys.executable, str(BENCH / "loadgen.py"), "--target", fovea.target, "--payload", str(path),
        "--protocol", PROTOCOLS[protocol], "--model", model, "--concurrency", str(args.concurrency),
        "--warmup", "0", "--duration", "600",
    ]  # fmt: skip
    from fovea.devtools.environment import subprocess_env

    # Until stopped once py-spy ends: py-spy reads the native libraries' symbols (seconds, for
    # TensorFlow's) before it samples.
    load = subprocess.Popen(
        argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        start = requests_ok(fovea)
        give_up = time.monotonic() + 60
        while requests_ok(fovea) == start:  # until the load generator is sending
            if load.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"the load generator did not start: {load.communicate()[1][-1500:]}")
            time.sleep(0.1)
        time.sleep(1.5)  # warm-up
        out = work / f"py-spy-{protocol}-{payload}.txt"
        pid = servers.pid("fovea")
        n0, cpu0, t0 = requests_ok(fovea), proc_cpu.tree_cpu_seconds([pid]), time.monotonic()
        threads0 = proc_cpu.threads_cpu_seconds(pid)
        spy = subprocess.run(
            [
                str(py_spy), "record", "--pid", str(pid), "--rate", str(args.profile_rate),
                "--duration", str(args.profile_seconds), "--native", "--format", "raw",
                "--output", str(out), "--full-filenames",
            ],
            capture_output=True, text=True,
        )  # fmt: skip
        threads1 = proc_cpu.threads_cpu_seconds(pid)
        n1, cpu1, t1 = requests_ok(fovea), proc_cpu.tree_cpu_seconds([pid]), time.monotonic()
    finally:
        load.terminate()
        load.wait(30)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {(spy.stderr or spy.stdout)[-1500:]}")
    samples = bucket_samples(out.read_text())
    return {
        "protocol": protocol,
        "payload": payload,
        "rate_hz": args.profile_rate,
        "seconds": t1 - t0,
        "requests": n1 - n0,
        "cpu_s": cpu1 - cpu0,
        "threads_cpu_s": thread_groups(threads0, threads1),
        "samples": samples,
        "top_frames": top_leaves(out.read_text()),
    }


def measure(args, work: Path) -> dict:
    models = args.models or work / "models"
    names = [p.model for p in PAYLOADS.values()]
    if all((models / name / "1").is_dir() for name in names):
        log(f"serving the null models in {models}")
    else:
        log("exporting the null models (96 and 224 px) with the trainer's export code")
        make_models(models, names)
    payloads = {"uint8-96": make_payloads(work, 96)["uint8"], "jpeg-224": photo_jpeg(work, 224)}
    with_pytriton = args.pytriton and (
        not args.quick
        or peers.ready_venv(args.venvs / "venv-pytriton", peers.PACKAGES["pytriton"]) is not None
    )
    if args.pytriton and not with_pytriton:
        log("no PyTriton venv (a quick run installs nothing): fovea only")
    began = time.monotonic()
    result: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "argv": sys.argv[1:],
        "machine": machine(),
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "window_s": args.seconds,
        "warmup_s": args.warmup,
        "fovea_flags": args.fovea_flags,
        "jpeg_bytes": payloads["jpeg-224"].stat().st_size,
        "servers": ["fovea"] + (["pytriton"] if with_pytriton else []),
        "windows": [],
        "profiles": [],
        "load_average_1min": [os.getloadavg()[0]],
    }
    servers, result["fovea_xla"] = start_servers(
        models, payloads, with_pytriton, args.venvs, args.fovea_flags.split(), work
    )
    result["startup_s"] = time.monotonic() - began
    rng = random.Random(args.seed)
    contenders = [c for c in CONTENDERS if c[0] in result["servers"]]
    try:
        for round_ in range(args.rounds):
            for payload in rng.sample(list(PAYLOADS), len(PAYLOADS)):
                for server, protocol in rng.sample(contenders, len(contenders)):
                    r = window(servers, server, protocol, payload, payloads[payload], args)
                    load = os.getloadavg()[0]
                    result["load_average_1min"].append(load)
                    result["windows"].append(
                        {
                            "round": round_,
                            "server": server,
                            "protocol": protocol,
                            "payload": payload,
                            "load_1min": load,
                            **r,
                        }
                    )
                    log(
                        f"round {round_ + 1} {payload:<8} {server:<8} {protocol:<9} {r['throughput']:7.0f} req/s, "
                        f"{r['server_cores']:.2f} cores, {r['per_core']:6.0f} req/s/core, p50 {r['p50_ms'] or 0:.1f} ms, "
                        f"errors {r['errors']}"
                        + (f", mean batch {r['mean_batch']:.1f}" if "mean_batch" in r else "")
                    )
        py_spy = ensure_py_spy(args) if args.profile_seconds > 0 else None
        if py_spy is not None:
            for payload in PAYLOADS:
                for protocol in PROTOCOLS:
                    try:
                        prof = profile(servers, py_spy, protocol, payload, payloads[payload], args, work)
                    except RuntimeError as exc:
                        log(f"profile {protocol} {payload}: {exc}")
                        result["profile_error"] = str(exc)[-500:]
                        break
                    result["profiles"].append(prof)
                    result["load_average_1min"].append(os.getloadavg()[0])
                    log(f"profile {protocol} {payload}: {_breakdown_line(breakdown(prof))}")
                else:
                    continue
                break
    finally:
        servers.stop()
    result["took_s"] = time.monotonic() - began
    return result


# --------------------------------------------------------------------------- py-spy samples


def frame_bucket(frame: str) -> str | None:
    """The bucket one frame names (`function (file:line)` or `function (library)`), None if it is
    neutral (the interpreter, numpy, TensorFlow, libc: they count for whoever called them)."""
    function, _, where = frame.partition(" (")
    function = function.rsplit(".", 1)[-1]  # py-spy names methods Class.method
    where = where.rstrip(")")
    for bucket, piece, functions in RULES:
        if piece in where and (functions is None or function in functions):
            return bucket
    return None


def stack_bucket(stack: list[str]) -> str:
    """A stack's bucket (root first, as py-spy writes it): the first frame from the leaf up that names one."""
    for frame in reversed(stack):
        bucket = frame_bucket(frame)
        if bucket is not None:
            return bucket
    return "other"


def _stacks(raw: str) -> list[tuple[list[str], int]]:
    out = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def idle(stack: list[str]) -> bool:
    """Whether a sample waits: one of its last frames is a wait (a lock, condition, poller, or an
    absl/TensorFlow waiter)."""
    for frame in stack[-4:]:
        name = frame.partition(" (")[0]
        if name in IDLE or "Waiter::Wait" in name or "WaitForNotification" in name:
            return True
    return False


def bucket_samples(raw: str) -> dict[str, int]:
    """py-spy's raw (collapsed) output → busy samples per bucket, and the idle ones under "idle"."""
    counts = dict.fromkeys((*BUCKETS, "idle"), 0)
    for stack, n in _stacks(raw):
        counts["idle" if idle(stack) else stack_bucket(stack)] += n
    return counts


def top_leaves(raw: str, most: int = 12) -> list[tuple[str, str, int]]:
    """The busy (leaf frame, bucket) pairs with the most samples: where to look first."""
    leaves: collections.Counter = collections.Counter()
    for stack, n in _stacks(raw):
        if not idle(stack):
            leaves[stack[-1], stack_bucket(stack)] += n
    return [(leaf, bucket, n) for (leaf, bucket), n in leaves.most_common(most)]


def thread_groups(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds between two `proc_cpu.threads_cpu_seconds` readings: the threads py-spy cannot
    see by the bucket their names give (NATIVE), the rest under "python"."""
    groups: dict[str, float] = collections.defaultdict(float)
    for tid, (name, seconds) in after.items():
        used = seconds - before.get(tid, (name, 0.0))[1]
        group = next((g for prefix, g in NATIVE.items() if name.startswith(prefix)), "python")
        groups[group] += used
    return dict(groups)


def breakdown(prof: dict, unsampled_us: float | None = None) -> dict:
    """µs of CPU per request by bucket. The CPU of the threads that run Python (/proc) is split by
    py-spy's shares of busy samples; threads that run no Python (TensorFlow's and gRPC's own) are
    charged from /proc by their names. py-spy's shares, not its counts: it counts a thread busy
    while it waits for a core. Sampling itself costs the process CPU (each sample stops and resumes
    every thread), so with `unsampled_us` (the CPU per request measured without py-spy) the
    buckets are their shares of that."""
    requests = max(prof["requests"], 1.0)
    samples = {b: prof["samples"][b] for b in BUCKETS}
    busy = sum(samples.values())
    threads = prof["threads_cpu_s"]
    python_us = threads.get("python", 0.0) / requests * 1e6
    us = {b: (n / busy if busy else 0.0) * python_us for b, n in samples.items()}
    us[TF_THREADS] = threads.get(TF_THREADS, 0.0) / requests * 1e6
    us["grpc/protobuf"] += threads.get("grpc/protobuf", 0.0) / requests * 1e6
    sampled_us = sum(us.values())
    if unsampled_us is not None and sampled_us > 0:
        us = {b: v / sampled_us * unsampled_us for b, v in us.items()}
    return {
        "requests_per_s": prof["requests"] / prof["seconds"] if prof["seconds"] else 0.0,
        "cpu_us_per_request": unsampled_us if unsampled_us is not None else prof["cpu_s"] / requests * 1e6,
        "sampled_cpu_us_per_request": prof["cpu_s"] / requests * 1e6,
        "us_per_request": us,
        "py_spy_busy_us_per_request": busy / prof["rate_hz"] / requests * 1e6,
        "idle_samples": prof["samples"].get("idle", 0),
        "busy_samples": busy,
    }


def _breakdown_line(b: dict) -> str:
    parts = ", ".join(f"{k} {v:.0f}" for k, v in b["us_per_request"].items())
    return f"{b['cpu_us_per_request']:.0f} µs CPU per request ({parts})"


# --------------------------------------------------------------------------- results


def case_key(protocol: str, payload: str) -> str:
    return f"{protocol}/{payload}"


def _per_round(result: dict, server: str, protocol: str, payload: str, key: str) -> list[float]:
    return [
        next(
            w[key]
            for w in result["windows"]
            if w["round"] == r
            and w["server"] == server
            and w["protocol"] == protocol
            and w["payload"] == payload
        )
        for r in range(result["rounds"])
    ]


def summarize(result: dict) -> dict:
    """The "host_path" key of summary.json."""
    loads = result["load_average_1min"]
    out: dict = {
        "date": result["date"],
        "quick": result["quick"],
        "model": "null model (constant softmax, reads one pixel), 10 classes",
        "concurrency": result["concurrency"],
        "max_batch": MAX_BATCH,
        "fovea": "defaults" + (f" {result['fovea_flags']}" if result["fovea_flags"] else ""),
        "rounds": result["rounds"],
        "window_s": result["window_s"],
        "jpeg_bytes": result["jpeg_bytes"],
        "took_s": round(result["took_s"], 1),
        "load_average_1min": {"min": min(loads), "max": max(loads)},
        "cases": {},
    }
    for payload in PAYLOADS:
        peer = None
        if "pytriton" in result["servers"]:
            peer = {
                k: _per_round(result, "pytriton", "kserve-v2", payload, k)
                for k in ("throughput", "server_cores", "per_core")
            }
        for protocol in PROTOCOLS:
            mine = {
                k: _per_round(result, "fovea", protocol, payload, k)
                for k in ("throughput", "server_cores", "per_core")
            }
            entry: dict = {
                "fovea": {
                    "rps": statistics.median(mine["throughput"]),
                    "cores": statistics.median(mine["server_cores"]),
                    "rps_per_core": statistics.median(mine["per_core"]),
                },
                "errors": sum(
                    w["errors"]
                    for w in result["windows"]
                    if w["protocol"] == protocol and w["payload"] == payload
                ),
            }
            if peer is not None:
                entry["pytriton"] = {
                    "rps": statistics.median(peer["throughput"]),
                    "cores": statistics.median(peer["server_cores"]),
                    "rps_per_core": statistics.median(peer["per_core"]),
                }
                entry["over_pytriton_per_core"] = spread(
                    [f / p for f, p in zip(mine["per_core"], peer["per_core"], strict=True)]
                )
                entry["over_pytriton_rps"] = spread(
                    [f / p for f, p in zip(mine["throughput"], peer["throughput"], strict=True)]
                )
            out["cases"][case_key(protocol, payload)] = entry
    if result["profiles"]:
        out["breakdown"] = {}
        for prof in result["profiles"]:
            key = case_key(prof["protocol"], prof["payload"])
            rate = out["cases"][key]["fovea"]["rps_per_core"]
            out["breakdown"][key] = breakdown(prof, 1e6 / rate if rate > 0 else None)
    out["h200"] = h200(out)
    return out


def h200(summary: dict) -> dict:
    """Host cores one H200 serving ResNet50 would need to be fed, from fovea's requests/s per core."""
    per_gpu = H200_SYSTEM_SAMPLES_PER_S / H200_GPUS
    cores = {
        key: per_gpu / case["fovea"]["rps_per_core"]
        for key, case in summary["cases"].items()
        if case["fovea"]["rps_per_core"] > 0
    }
    peer = {
        key: per_gpu / case["pytriton"]["rps_per_core"]
        for key, case in summary["cases"].items()
        if case.get("pytriton", {}).get("rps_per_core", 0) > 0
    }
    return {
        "source": "MLPerf Inference v4.1 (MLCommons), closed, NVIDIA H200-SXM-141GBx8_TRT, ResNet50 Offline "
        f"{H200_SYSTEM_SAMPLES_PER_S} samples/s over {H200_GPUS} GPUs; published, not measured here",
        "images_per_s_per_gpu": per_gpu,
        "fovea_cores": cores,
        "pytriton_cores": peer,
    }


def _range(s: dict, fmt: str) -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def docs_section(result: dict, summary: dict) -> str:
    load = summary["load_average_1min"]
    peer = "pytriton" in result["servers"]
    head = "| case | fovea req/s | fovea cores | fovea req/s per core |"
    rule = "| --- | --- | --- | --- |"
    if peer:
        head += " PyTriton req/s | PyTriton cores | PyTriton req/s per core | fovea ÷ PyTriton per core | fovea ÷ PyTriton req/s |"
        rule += " --- | --- | --- | --- | --- |"
    rows = [head, rule]
    for key, c in summary["cases"].items():
        protocol, payload = key.split("/")
        f = c["fovea"]
        row = f"| {protocol}, {PAYLOADS[payload].name} | {f['rps']:.0f} | {f['cores']:.2f} | **{f['rps_per_core']:.0f}** |"
        if peer:
            p = c["pytriton"]
            row += (
                f" {p['rps']:.0f} | {p['cores']:.2f} | {p['rps_per_core']:.0f} | "
                f"**{_range(c['over_pytriton_per_core'], '.2f')}** | {_range(c['over_pytriton_rps'], '.2f')} |"
            )
        rows.append(row)
    table = "\n".join(rows)
    parts = [
        f"""## The host path at GPU speed: requests per server core (null model, concurrency {summary["concurrency"]})

Measured by `{" ".join(["python bench/host_path.py", *result.get("argv", [])])}` on {result["date"]} ({result["took_s"] / 60:.1f} minutes including
start-up). Machine: {result["machine"]}. 1-minute load average {load["min"]:.1f} to {load["max"]:.1f}
(a shared host: other work ran beside this one; interleaving puts its noise on both servers alike).

A model that costs next to nothing (it reads one pixel per image and answers a constant softmax over 10
classes), published with the trainer's export code at 96 and 224 px, so every microsecond measured is
the server's own: transport, parsing, decoding, batching, answering. fovea ran its defaults
(`fovea serve`{_xla_note(result)}); PyTriton 0.7 served the
same SavedModel version (Triton's dynamic batcher, no queue delay, max batch {MAX_BATCH}; its bytes model calls
the version's bytes signature, which decodes in the graph with the same TensorFlow ops fovea decodes with).
Both were up at once and loaded one at a time by `bench/loadgen.py` (closed loop, {summary["concurrency"]}
callers, one image per request), {result["rounds"]} rounds of {result["window_s"]:g}-second windows (after
{result["warmup_s"]:g} s of warm-up) in a shuffled order; the JPEG is {result["jpeg_bytes"] / 1024:.1f} KiB
(quality 90, a photo-like image), sent as fovea.v1 `encoded` or as KServe v2 BYTES. PyTriton speaks only
KServe v2, so both fovea rows of a payload compare with its one window of that payload in the same round.
**Requests/s per server core** is requests/s divided by the CPU the server's whole process tree used
over the window (utime + stime of every process and thread in /proc: for PyTriton, Triton's C++ server
and its Python model process together), in cores. Medians of the rounds; ratios are medians of
per-round ratios (range in brackets).

{table}
""",
    ]
    if "breakdown" in summary:
        parts.append(breakdown_table(summary["breakdown"]))
    parts.append(h200_text(summary))
    return "\n".join(parts)


def _xla_note(result: dict) -> str:
    lines = result.get("fovea_xla", [])
    if not lines:
        return ", XLA off"
    sizes = "; ".join(line.split("serving ", 1)[-1].split(" compiled", 1)[0] for line in lines)
    return f", XLA on; batch sizes served compiled per model: {sizes}"


def breakdown_table(b: dict) -> str:
    keys = list(b)
    head = "| bucket | " + " | ".join(k.replace("/", ", ").replace("-", " ") for k in keys) + " |"
    rows = [head, "|" + " --- |" * (len(keys) + 1)]
    for bucket in (*BUCKETS, TF_THREADS):
        rows.append(
            f"| {bucket} | " + " | ".join(f"{b[k]['us_per_request'][bucket]:.0f}" for k in keys) + " |"
        )
    rows.append(
        "| **total: CPU per request, unsampled (the table above)** | "
        + " | ".join(f"**{b[k]['cpu_us_per_request']:.0f}**" for k in keys)
        + " |"
    )
    rows.append(
        "| CPU per request while sampled (/proc) | "
        + " | ".join(f"{b[k]['sampled_cpu_us_per_request']:.0f}" for k in keys)
        + " |"
    )
    rows.append(
        "| requests/s while sampled | " + " | ".join(f"{b[k]['requests_per_s']:.0f}" for k in keys) + " |"
    )
    return f"""Where fovea's CPU goes, in µs per request (py-spy 0.4 `record --native`, fovea alone at concurrency
{CONCURRENCY}; each stack goes to the bucket of its first frame from the leaf up that names one:
grpc/protobuf is gRPC's Python, Cython and C core (with the kernel's send and receive under it),
protobuf, and fovea's servicers, plus gRPC's own threads; decode is the header check, decode and
resize as called from Python; batcher/asyncio the event loop, futures, thread hand-offs and the
batcher; model call the signature call from Python; metrics/logging Prometheus, logging, tracing and
the per-call wrapper; other the rest of fovea's core and anything unnamed). Samples waiting on a
lock, a condition or the poller are dropped as idle. The CPU of the threads that run Python (from
/proc, per thread, over the same seconds) is split by py-spy's shares of busy samples; the threads
that run no Python, which py-spy cannot see, are charged from /proc by name: TensorFlow's own
threads (the decode's and the model's ops, whichever ran) and gRPC's. Sampling costs the process
CPU itself (every sample stops and resumes each thread) and slows it, so the buckets are these shares
of the CPU per request measured without py-spy (the table above); the CPU per request and the
requests/s while sampled are shown below them (with `--native`, each sample unwinds every thread
through TensorFlow's large libraries: fovea ran several times slower while sampled, so read the
buckets as shares; on this host they held within a few points between 100 and 200 samples/s).

{chr(10).join(rows)}
"""


def h200_text(summary: dict) -> str:
    h = summary["h200"]
    per_gpu = h["images_per_s_per_gpu"]
    lines = []
    for key, cores in h["fovea_cores"].items():
        protocol, payload = key.split("/")
        rate = summary["cases"][key]["fovea"]["rps_per_core"]
        peer = h["pytriton_cores"].get(key)
        extra = (
            f" (PyTriton: {per_gpu:,.0f} ÷ {summary['cases'][key]['pytriton']['rps_per_core']:.0f} ≈ {peer:.0f} cores)"
            if peer
            else ""
        )
        lines.append(
            f"- {protocol}, {PAYLOADS[payload].name}: {per_gpu:,.0f} ÷ {rate:.0f} ≈ **{cores:.0f} cores**{extra}"
        )
    return f"""### How many host cores one H200 serving ResNet50 would need

The GPU's rate is a published figure, not measured here: MLCommons' MLPerf Inference v4.1 results
(closed division, datacenter), NVIDIA's system of 8 H200-SXM-141GB GPUs with TensorRT, ResNet50
Offline: {H200_SYSTEM_SAMPLES_PER_S:,} samples/s, so {H200_SYSTEM_SAMPLES_PER_S:,} ÷ {H200_GPUS} = {per_gpu:,.0f} images/s per GPU. (MLPerf's
harness hands the GPU preprocessed tensors from host memory: no network, no decode; a served model
pays both.) At one image per request, feeding that rate takes requests/s ÷ requests/s per core:

{chr(10).join(lines)}

The 224 px JPEG row is the realistic one (photos arrive encoded; decoding them is host work whatever
serves them). These are this host's cores (the machine line above); the count scales with how
fast a GPU server's cores are against these. Requests of several images each would spread the
per-request part over their images.
"""


def write_outputs(result: dict, out: Path, docs: Path | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_path.json").write_text(json.dumps(result, indent=1) + "\n")
    summary = summarize(result)
    merge_summary(out / "summary.json", {"host_path": summary})
    if docs is not None:
        write_section(docs, SECTION, docs_section(result, summary))
    return summary


def print_summary(summary: dict) -> None:
    for key, c in summary["cases"].items():
        line = f"{key:<18} fovea {c['fovea']['rps']:6.0f} req/s, {c['fovea']['rps_per_core']:6.0f} per core"
        if "pytriton" in c:
            line += (
                f"; pytriton {c['pytriton']['rps']:6.0f} req/s, {c['pytriton']['rps_per_core']:6.0f} per core; "
                f"fovea ÷ pytriton per core {_range(c['over_pytriton_per_core'], '.2f')}"
            )
        print(line)
    for key, b in summary.get("breakdown", {}).items():
        print(f"{key:<18} {_breakdown_line(b)}")
    for key, cores in summary["h200"]["fovea_cores"].items():
        print(f"{key:<18} one H200 on ResNet50 needs about {cores:.0f} of these cores")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of short windows; nothing installed")
    parser.add_argument("--rounds", type=int, help="default 3 (quick: 1)")
    parser.add_argument("--seconds", type=float, help="measuring time per window; default 5 (quick: 1)")
    parser.add_argument("--warmup", type=float, help="warm-up per window; default 1.5 (quick: 0.5)")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument(
        "--profile-seconds", type=int, help="py-spy per case, whole seconds; default 4 (quick: 1); 0: none"
    )
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--py-spy", help="py-spy binary (default: VENVS/venv-pyspy, made on first use)")
    parser.add_argument("--no-pytriton", dest="pytriton", action="store_false", help="fovea alone")
    parser.add_argument("--fovea-flags", default="", help="extra `fovea serve` flags, e.g. --no-xla")
    parser.add_argument(
        "--models", type=Path, help="a models folder with null96/1 and null224/1 (exported there if absent)"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the shuffled order")
    parser.add_argument(
        "--venvs", type=Path, default=Path("/work"), help="where venv-pytriton and venv-pyspy live"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="leave --docs alone (quick runs always do)")
    parser.add_argument(
        "--render", action="store_true", help="only redo the outputs from --out/host_path.json"
    )
    args = parser.parse_args()
    # A stopped run still stops every server it started (the finally blocks), PyTriton included.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    defaults = {"rounds": (3, 1), "seconds": (5.0, 1.0), "warmup": (1.5, 0.5), "profile_seconds": (4, 1)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.render:
        result = json.loads((args.out / "host_path.json").read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="fovea-host-path-") as tmp:
            result = measure(args, Path(tmp))
    docs = None if result["quick"] or args.no_docs else args.docs
    summary = write_outputs(result, args.out, docs)
    print_summary(summary)
    log(f"took {result['took_s']:.0f} s; results in {args.out}" + (f", {docs}" if docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
