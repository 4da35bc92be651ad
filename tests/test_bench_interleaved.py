"""bench/interleaved.py's arithmetic and outputs, from a made-up run (no servers, no timing).

`--render` redoes the summary, table, plot and docs section from --out/interleaved.json; here that
file holds known figures, so the per-round ratios, their medians and ranges can be checked exactly,
and so can the merge that must leave other scripts' keys and sections alone. The measuring half is
exercised by `python bench/interleaved.py --quick` (over a minute on a shared host: not in CI).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Two rounds at two concurrencies; the ceiling measured three times (before, between, after).
CEILINGS = [{"1": 100.0, "4": 200.0}, {"1": 80.0, "4": 250.0}, {"1": 90.0, "4": 150.0}]
SPEEDS = {  # (contender, level) → img/s in rounds 0 and 1
    ("fovea", 1): (90.0, 60.0),
    ("fovea", 4): (200.0, 150.0),
    ("pytriton", 1): (45.0, 30.0),
    ("pytriton", 4): (100.0, 300.0),
    ("mlserver", 1): (60.0, 20.0),
    ("mlserver", 4): (50.0, 100.0),
}


def made_up_run() -> dict:
    windows = [
        {
            "round": r,
            "contender": n,
            "level": c,
            "load_1min": 1.0 + r,
            "throughput": v[r],
            "p50_ms": 1.0,
            "errors": 0,
        }
        for (n, c), v in SPEEDS.items()
        for r in (0, 1)
    ]
    return {
        "date": "2026-12-02T19:00:00+00:00",
        "quick": False,
        "model": "resnet50",
        "image_size": 96,
        "contenders": ["fovea", "pytriton", "mlserver"],
        "levels": [1, 4],
        "rounds": 2,
        "window_s": 6.0,
        "warmup_s": 2.0,
        "machine": "a test",
        "windows": windows,
        "ceilings": CEILINGS,
        "load_average_1min": [1.0, 2.0, 3.0],
        "startup_s": 1.0,
        "took_s": 60.0,
    }


def render(run: dict, out: Path, docs: Path, env: dict) -> None:
    """`interleaved.py --render` of a made-up run into `out` and `docs`."""
    (out / "interleaved.json").write_text(json.dumps(run))
    argv = [
        sys.executable,
        str(ROOT / "bench" / "interleaved.py"),
        "--render",
        "--out",
        str(out),
        "--docs",
        str(docs),
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_render_gives_per_round_ratios_and_keeps_other_outputs(tmp_path: Path, fovea_env) -> None:
    out, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"efficiency": 0.5, "tiny": {"p50_ms_c1": 1.4}}))
    docs.write_text("# Benchmarks\n\nIntro.\n\n## Against the model's own speed\n\nrun.py's table\n")
    for _ in range(2):  # a second render replaces the section instead of adding another
        render(made_up_run(), out, docs, fovea_env)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["efficiency"] == 0.5 and summary["tiny"] == {"p50_ms_c1": 1.4}
    at1, at4 = summary["interleaved"]["1"], summary["interleaved"]["4"]
    # A round's ceiling is the better of the measurements before and after it.
    assert at1["ceiling"] == 95.0  # median of max(100, 80) and max(80, 90)
    assert at1["over_ceiling"]["rounds"] == [0.9, 60.0 / 90.0]
    assert at4["over_ceiling"]["rounds"] == [200.0 / 250.0, 150.0 / 250.0]
    # Against the best peer of the same round: MLServer in round 0, PyTriton in round 1 at c=1.
    assert at1["over_best_peer"]["rounds"] == [1.5, 2.0]
    assert at1["over_best_peer"]["median"] == 1.75
    assert at4["over_best_peer"] == {"median": 1.25, "min": 0.5, "max": 2.0, "rounds": [2.0, 0.5]}
    assert at4["fovea"] == 175.0 and at4["peers"] == {"pytriton": 200.0, "mlserver": 75.0}
    assert summary["interleaved"]["load_average_1min"] == {"min": 1.0, "max": 3.0}

    text = docs.read_text()
    assert text.count("<!-- interleaved: generated") == 1
    assert text.index("## Interleaved") < text.index("## Against the model's own speed")
    assert "run.py's table" in text and "interleaved" in text and "1.75 (1.50-2.00)" in text
    assert (out / "interleaved.md").read_text() in text
    assert (out / "interleaved.png").stat().st_size > 0


def test_run_py_rewrite_keeps_the_interleaved_section(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from report_files import keep_sections, put_section
    finally:
        sys.path.remove(str(ROOT / "bench"))
    old = put_section("# B\n\n## Other\n\nold figures\n", "interleaved", "## Interleaved\n\nratios")
    rewritten = keep_sections(old, "# B\n\nnew intro\n\n## Other\n\nnew figures\n")
    assert "ratios" in rewritten and "new figures" in rewritten and "old figures" not in rewritten
    assert rewritten.index("ratios") < rewritten.index("## Other")
    # A second script's section goes after the first, not inside it, and both survive.
    both = put_section(rewritten, "interleaved-overhead", "## Overhead\n\nms")
    assert put_section(both, "interleaved", "## Interleaved\n\nnew ratios").count("<!--") == 4
    assert (
        both.index("<!-- /interleaved -->")
        < both.index("<!-- interleaved-overhead:")
        < both.index("## Other")
    )
    assert keep_sections(both, "# B\n\n## Other\n").count("generated, do not edit") == 2


def test_a_ceiling_window_in_each_block_is_what_that_blocks_ratios_divide_by(
    tmp_path: Path, fovea_env
) -> None:
    run = made_up_run()
    del run["ceilings"]  # today's runs measure the ceiling as one more window of each block
    run["ceiling_s"] = 3.0
    ceiling = {1: (100.0, 50.0), 4: (400.0, 100.0)}  # a host that slows to half between rounds, and more
    run["windows"] += [
        {
            "round": r,
            "contender": "ceiling",
            "level": c,
            "load_1min": 1.0,
            "throughput": v[r],
            "batch_size": c,
        }
        for c, v in ceiling.items()
        for r in (0, 1)
    ]
    for i, w in enumerate(run["windows"]):
        w["steal_share"] = i / 100
    out, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    out.mkdir()
    docs.write_text("# Benchmarks\n")
    render(run, out, docs, fovea_env)

    summary = json.loads((out / "summary.json").read_text())["interleaved"]
    # Each round's fovea window over the same round's ceiling window: 90/100 and 60/50 at c=1.
    assert summary["1"]["over_ceiling"]["rounds"] == [0.9, 1.2]
    assert summary["4"]["over_ceiling"]["rounds"] == [0.5, 1.5]
    assert summary["4"]["ceiling"] == 250.0
    assert summary["steal_share"] == {"min": 0.0, "max": (len(run["windows"]) - 1) / 100}
    text = docs.read_text()
    assert (
        "one more window of each block" in text and "50-100 at batch 1" in text and "CPU steal 0% to" in text
    )
