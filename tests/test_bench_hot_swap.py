"""bench/hot_swap.py's arithmetic and outputs, from a made-up timeline (no server, no timing).

The measuring half runs with `python bench/hot_swap.py --quick` (a real server, about a minute on a
shared host: not in CI); here known request timings give known windows, p99s, throughputs and ratios,
and the outputs must merge into summary.json and docs/benchmarks.md leaving the rest alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import hot_swap  # noqa: E402

STEADY_S = 10.0
# Two swaps: publish, the server starting to load, and the last of loaded/released/compiled.
SWAPS = [
    {"version": 2, "publish": 112.0, "load_start": 114.0, "done": 120.0},
    {"version": 3, "publish": 132.0, "load_start": 133.0, "done": 138.0},
]


def made_up_timeline() -> list[tuple[float, float, str]]:
    """100 requests a second from t=100 to t=160, answered in 100 ms; while the first swap loads they
    take 300 ms, while the second does 120 ms and one in ten is shed at once."""
    records = []
    for i in range(6000):
        due = 100 + i / 100
        latency, code = 0.1, "OK"
        if 114 <= due < 120:
            latency = 0.3
        elif 133 <= due < 138:
            latency, code = (0.001, "RESOURCE_EXHAUSTED") if i % 10 == 0 else (0.12, "OK")
        records.append((due, latency, code))
    return records


def test_a_swap_with_a_background_compile_gets_a_p99_for_each_part() -> None:
    """Loading (114-117) at 300 ms, then the XLA compile (117-120) at 200 ms; steady at 100 ms."""
    records = [(100 + i / 100, 0.3 if 114 <= 100 + i / 100 < 117 else 0.2 if 117 <= 100 + i / 100 < 120 else 0.1, "OK")
               for i in range(4000)]  # fmt: skip
    swap = {
        "version": 2,
        "publish": 112.0,
        "load_start": 114.0,
        "loaded": 117.0,
        "compiled": 120.0,
        "done": 120.0,
    }
    row = hot_swap.report(records, [swap], STEADY_S, info())["swaps"][0]
    assert row["loading_p99_ratio"] == pytest.approx(3.0)
    assert row["compiling_p99_ratio"] == pytest.approx(2.0)
    assert row["p99_ratio"] == pytest.approx(3.0)
    plain = {k: v for k, v in swap.items() if k != "compiled"}  # --no-xla: nothing compiles
    row = hot_swap.report(records, [plain], STEADY_S, info())["swaps"][0]
    assert row["compiling"] is None and row["compiling_p99_ratio"] is None


def info() -> dict:
    return {
        "quick": False,
        "date": "2026-12-03T00:00:00+00:00",
        "model": "resnet50",
        "image_size": 96,
        "server_flags": "",
        "capacity_rps": 200.0,
        "rate_rps": 100.0,
        "load_average_1min": [1.0, 2.0, 1.5],
        "took_s": 180.0,
    }


def test_windows_ratios_and_medians() -> None:
    result = hot_swap.report(made_up_timeline(), SWAPS, STEADY_S, info())
    first, second = result["swaps"]
    assert first["before"]["p99_ms"] == pytest.approx(100)
    assert first["during"]["p99_ms"] == pytest.approx(300)
    assert first["p99_ratio"] == pytest.approx(3.0)
    # Completions in [114, 120): the 10 due just before 114 (at 100 ms) and those due up to 119.7.
    assert first["during"]["throughput_rps"] == pytest.approx(580 / 6, rel=0.01)
    assert first["before"]["throughput_rps"] == pytest.approx(100, rel=0.01)
    assert first["throughput_ratio"] == pytest.approx(0.967, rel=0.01)
    assert first["poll_wait_s"] == 2.0 and first["swap_s"] == 6.0
    # Counted from the publish, the two quiet seconds of the poll wait dilute the swap.
    assert first["from_publish"]["seconds"] == 8.0
    assert first["from_publish_throughput_ratio"] > first["throughput_ratio"]
    assert second["during"]["errors"] == {"RESOURCE_EXHAUSTED": 50}
    assert second["p99_ratio"] == pytest.approx(1.2)
    assert second["throughput_ratio"] == pytest.approx(0.9, rel=0.02)  # the shed tenth never completes OK
    assert second["after"]["p99_ms"] == pytest.approx(100)
    summary = result["summary"]
    assert summary["p99_ratio"] == pytest.approx(2.1)  # median of 3.0 and 1.2
    assert summary["p99_ratios"] == [pytest.approx(3.0), pytest.approx(1.2)]
    assert summary["meets_targets"] is False
    phases = {row["second"]: row["phase"] for row in result["per_second"]}
    assert phases[13] == "poll wait 2" and phases[15] == "swap to 2" and phases[25] == ""
    assert result["per_second"][0]["sent"] == 100


def test_outputs_merge_into_summary_and_docs(tmp_path: Path) -> None:
    out, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"interleaved": {"1": {"fovea": 5.0}}}))
    docs.write_text("# Benchmarks\n\n<!-- other: generated, do not edit -->\nkept\n<!-- /other -->\n")
    result = hot_swap.report(made_up_timeline(), SWAPS, STEADY_S, info())
    hot_swap.write(result, out, docs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interleaved"] == {"1": {"fovea": 5.0}}
    assert summary["swap"]["p99_ratio"] == pytest.approx(2.1)
    assert [s["version"] for s in summary["swap"]["swaps"]] == [2, 3]
    assert summary["swap"]["swaps"][0]["during"]["p99_ms"] == pytest.approx(300)
    text = docs.read_text()
    assert "kept" in text and "<!-- hot-swap: generated, do not edit -->" in text
    assert "| to version 2 |" in text and "**missed**" in text
    assert (out / "hot_swap.csv").read_text().splitlines()[
        0
    ] == "second,phase,sent,ok_done,errors,p50_ms,p99_ms"
