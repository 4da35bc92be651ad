"""bench/host_path.py's arithmetic and outputs from a made-up run (no servers, no timing), the
grouping of py-spy's samples into buckets, and bench/proc_cpu.py's process-tree CPU.

The measuring half is exercised by `python bench/host_path.py --quick` (a minute on a shared host).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import host_path
        import proc_cpu

        yield host_path, proc_cpu
    finally:
        sys.path.remove(str(ROOT / "bench"))


# (server, protocol, payload) → (req/s, server cores) in rounds 0 and 1
WINDOWS = {
    ("fovea", "fovea.v1", "uint8-96"): ((2000.0, 1.0), (1800.0, 1.2)),
    ("fovea", "kserve-v2", "uint8-96"): ((1500.0, 1.0), (1600.0, 1.0)),
    ("pytriton", "kserve-v2", "uint8-96"): ((1000.0, 1.0), (900.0, 1.5)),
    ("fovea", "fovea.v1", "jpeg-224"): ((800.0, 2.0), (700.0, 1.75)),
    ("fovea", "kserve-v2", "jpeg-224"): ((600.0, 1.5), (600.0, 2.0)),
    ("pytriton", "kserve-v2", "jpeg-224"): ((500.0, 2.0), (400.0, 2.0)),
}


def made_up_run() -> dict:
    windows = [
        {
            "round": r,
            "server": server,
            "protocol": protocol,
            "payload": payload,
            "load_1min": 1.0,
            "throughput": v[r][0],
            "server_cores": v[r][1],
            "per_core": v[r][0] / v[r][1],
            "p50_ms": 30.0,
            "errors": 0,
        }
        for (server, protocol, payload), v in WINDOWS.items()
        for r in (0, 1)
    ]
    profile = {
        "protocol": "kserve-v2",
        "payload": "jpeg-224",
        "rate_hz": 100,
        "seconds": 4.0,
        "requests": 2000.0,
        "cpu_s": 3.0,  # 1500 µs per request
        # The Python threads' CPU is split by py-spy's shares; the others are charged by name.
        "threads_cpu_s": {"python": 2.0, "TensorFlow's threads": 0.6, "grpc/protobuf": 0.4},
        "samples": {
            "idle": 1000,
            "grpc/protobuf": 200,
            "decode": 100,
            "batcher/asyncio": 50,
            "model call": 25,
            "metrics/logging": 25,
            "other": 0,
        },
        "top_frames": [],
    }
    return {
        "date": "2026-12-03T00:00:00+00:00",
        "quick": False,
        "machine": "a test",
        "concurrency": 64,
        "rounds": 2,
        "window_s": 5.0,
        "warmup_s": 1.5,
        "fovea_flags": "",
        "jpeg_bytes": 20480,
        "servers": ["fovea", "pytriton"],
        "windows": windows,
        "profiles": [profile],
        "load_average_1min": [1.0, 2.5],
        "fovea_xla": [": compiled 6 sizes"],
        "startup_s": 10.0,
        "took_s": 300.0,
    }


def test_render_gives_per_core_ratios_breakdown_and_h200_cores(tmp_path: Path, fovea_env) -> None:
    out, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    out.mkdir()
    (out / "host_path.json").write_text(json.dumps(made_up_run()))
    (out / "summary.json").write_text(json.dumps({"efficiency": 0.5}))
    docs.write_text("# Benchmarks\n\nIntro.\n\n## Other\n\nrun.py's table\n")
    argv = [
        sys.executable,
        str(ROOT / "bench" / "host_path.py"),
        "--render",
        "--out",
        str(out),
        "--docs",
        str(docs),
    ]
    for _ in range(2):  # a second render replaces the section
        run = subprocess.run(argv, env=fovea_env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["efficiency"] == 0.5
    cases = summary["host_path"]["cases"]
    v1 = cases["fovea.v1/uint8-96"]
    assert v1["fovea"]["rps"] == 1900.0
    assert v1["fovea"]["rps_per_core"] == pytest.approx((2000.0 + 1500.0) / 2)
    assert v1["pytriton"]["rps_per_core"] == pytest.approx((1000.0 + 600.0) / 2)
    # Per-round ratios of requests/s per core against PyTriton's window of the same payload and round.
    assert v1["over_pytriton_per_core"]["rounds"] == pytest.approx([2.0, 1500.0 / 600.0])
    assert v1["over_pytriton_rps"]["rounds"] == pytest.approx([2.0, 2.0])
    jpeg = cases["kserve-v2/jpeg-224"]
    assert jpeg["over_pytriton_per_core"]["rounds"] == pytest.approx([400.0 / 250.0, 300.0 / 200.0])
    # The breakdown: py-spy's shares of the Python threads' 1000 µs per request, plus the others
    # (1500 µs while sampled), as shares of the unsampled CPU per request (1e6 / 350 req/s per core).
    b = summary["host_path"]["breakdown"]["kserve-v2/jpeg-224"]
    assert b["sampled_cpu_us_per_request"] == pytest.approx(1500.0)
    unsampled = 1e6 / 350.0
    assert b["cpu_us_per_request"] == pytest.approx(unsampled)
    assert b["us_per_request"]["grpc/protobuf"] == pytest.approx((500.0 + 200.0) / 1500.0 * unsampled)
    assert b["us_per_request"]["decode"] == pytest.approx(250.0 / 1500.0 * unsampled)
    assert b["us_per_request"]["TensorFlow's threads"] == pytest.approx(300.0 / 1500.0 * unsampled)
    assert sum(b["us_per_request"].values()) == pytest.approx(unsampled)
    assert b["py_spy_busy_us_per_request"] == pytest.approx(400 / 100 / 2000 * 1e6)
    h200 = summary["host_path"]["h200"]
    assert h200["images_per_s_per_gpu"] == 756_960 / 8
    assert h200["fovea_cores"]["fovea.v1/jpeg-224"] == pytest.approx(94_620 / ((400.0 + 400.0) / 2))

    text = docs.read_text()
    assert text.count("<!-- host-path: generated") == 1
    assert "run.py's table" in text and "MLPerf Inference v4.1" in text
    assert "94,620 ÷ 400 ≈ **237 cores**" in text
    assert "| decode |" in text


def test_samples_go_to_the_bucket_of_the_nearest_named_frame(bench) -> None:
    host_path, _ = bench
    raw = "\n".join(
        [
            # TensorFlow under the model call is the model call; under decode it is decode.
            "_bootstrap (threading.py:1002);LoadedModel.predict (/s/fovea/server/loader.py:200);TFE_Py_Execute (libtensorflow_framework.so.2) 7",
            "_worker (concurrent/futures/thread.py:83);LoadedModel.decode (/s/fovea/server/loader.py:230);TFE_Py_Execute (libtensorflow_framework.so.2) 5",
            # Waits are idle, wherever they are.
            "_worker (concurrent/futures/thread.py:83);_queue_SimpleQueue_get (x.c);PyThread_acquire_lock_timed (libpython3.11.so);0x7f2 (libc.so.6) 50",
            "RunSync (libtensorflow_framework.so.2);absl::FutexWaiter::WaitUntil (libtensorflow_framework.so.2);syscall (libc.so.6) 20",
            # protobuf called from the servicer, grpc's C core, a metric, the event loop, fovea's core.
            "_run (asyncio/events.py:84);_predict (fovea/server/servicer.py:60);upb_Encode (_message.abi3.so) 3",
            "_run (asyncio/events.py:84);grpc_call_start_batch (cygrpc.cpython-311-x86_64-linux-gnu.so) 4",
            "_run (asyncio/events.py:84);__exit__ (fovea/server/calls.py:80);inc (prometheus_client/metrics.py:300) 2",
            "_run_once (asyncio/base_events.py:1900);PyObject_Call (libpython3.11.so.1.0) 6",
            "_run (asyncio/events.py:84);_predict_on (fovea/server/core.py:300);argsort (numpy/core/fromnumeric.py:1100) 1",
            "_compute (fovea/server/batcher.py:650);zeros (numpy) 2",
            "mystery (libc.so.6) 9",
        ]
    )
    assert host_path.bucket_samples(raw) == {
        "grpc/protobuf": 7,
        "decode": 5,
        "batcher/asyncio": 8,
        "model call": 7,
        "metrics/logging": 2,
        "other": 10,
        "idle": 70,
    }
    assert host_path.top_leaves(raw, 1) == [("mystery (libc.so.6)", "other", 9)]


def test_process_tree_cpu_counts_children(bench) -> None:
    _, proc_cpu = bench
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    # A parent that starts a child which burns CPU, then both wait: the tree holds both.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(30)",
        ]
    )
    try:
        give_up = time.monotonic() + 20
        while proc_cpu.tree_cpu_seconds([parent.pid]) < 0.3 and time.monotonic() < give_up:
            time.sleep(0.1)
        assert len(proc_cpu.tree(parent.pid)) == 2
        assert proc_cpu.tree_cpu_seconds([parent.pid]) >= 0.3
    finally:
        for pid in proc_cpu.tree(parent.pid)[1:]:
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait()
