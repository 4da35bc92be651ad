"""Hot swap under load: new versions published while an open loop at half capacity runs.

    python bench/hot_swap.py            # ResNet50 at 96 px, fovea's defaults, 3 swaps (about 4 minutes)
    python bench/hot_swap.py --quick    # tiny model, 2 short swaps, --poll-interval 1: a harness check

Exports the model as bench/run.py does, and stages copies of that export as hidden temporary folders
beside it (fovea.contract.TEMP_PREFIX, as the trainer writes a version before its rename), so no copying
runs during the measurement. The copies have version 1's weights; a retrain has other weights in the
same graph, and the server treats both alike (it shares XLA programs by graph, and the new version's
own variables are loaded and checked: tests/test_server_xla.py uses other weights). Starts `fovea serve` with its defaults and waits for its XLA compile,
measures capacity (bench/overload.py's closed-loop saturation, on this server), then runs one open loop
(Poisson, bench/loadgen.py, uint8 images) at half of it. During the loop, after a steady window, the
next version is published the way the trainer publishes (the staged folder renamed to the next
version number); the script waits until the server has loaded it, released the old version and
compiled the new one's XLA sizes, runs another steady window, and publishes the next.

Per swap, from every request's due time and latency: p99 latency (requests due in the window) and
throughput (OK answers completed in it, per second) in the steady window before the swap, during it,
and in the steady window after it. "During" is counted from when the server starts loading the new
version (its log line; the wait for the next --poll-interval scan before it serves the old version as
usual) until the last of: new version loaded and serving, old version released, new version's XLA
compile done; the figures from the publish itself are kept too. Ratios are during ÷ before; the
targets (issue 18, item 7) are p99 <= 1.5x steady and throughput >= 0.8x, judged on the median over
the swaps.

Writes hot_swap.json and hot_swap.csv (per second) under --out, summary.json's `swap`, and with a full
run the hot-swap section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

# run.py puts client/, server/, trainer/ and devtools/ on sys.path when imported.
from overload import machine_load, saturated, serve  # noqa: E402
from report_files import machine, merge_summary, write_section  # noqa: E402
from run import log, make_models, make_payloads, stop_server  # noqa: E402

TARGETS = {"p99_ratio": 1.5, "throughput_ratio": 0.8}
SECTION = "hot-swap"


# --------------------------------------------------------------------------- the server's log


class LogTimes:
    """The server's output lines with the time.monotonic() each arrived at (its `echo`)."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()

    def __call__(self, line: str) -> None:
        with self._changed:
            self.lines.append((time.monotonic(), line))
            self._changed.notify_all()

    def wait_for(self, after: float, timeout: float, *texts: str) -> float:
        """When the first line holding one of `texts` arrived after `after`; TimeoutError past `timeout`."""
        give_up = time.monotonic() + timeout
        with self._changed:
            while True:
                for at, line in self.lines:
                    if at >= after and any(t in line for t in texts):
                        return at
                left = give_up - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the server logged none of {texts} within {timeout:.0f} s")
                self._changed.wait(left)


# --------------------------------------------------------------------------- publishing


def stage(model_root: Path, versions: list[int]) -> dict[int, Path]:
    """Copies of version 1 as hidden temporary folders, one per future version, fovea.json renumbered."""
    from fovea.contract import METADATA_FILE, TEMP_PREFIX, ModelMetadata

    source = model_root / "1"
    staged = {}
    for version in versions:
        tmp = model_root / f"{TEMP_PREFIX}hot-swap-{version}"
        shutil.copytree(source, tmp)
        meta_file = tmp / METADATA_FILE
        meta = ModelMetadata.from_json(meta_file.read_text())
        meta_file.write_text(meta.replace(version=version).to_json())
        staged[version] = tmp
    return staged


def publish(staged: Path, model_root: Path, version: int) -> float:
    """Rename a staged folder into place, as the trainer's export does; when it happened."""
    os.rename(staged, model_root / str(version))
    return time.monotonic()


# --------------------------------------------------------------------------- the figures


def window(records: list[tuple[float, float, str]], start: float, end: float) -> dict:
    """Latency of the requests due in [start, end) and OK answers completed in it, per second."""
    import numpy as np

    due = [(lat, code) for t, lat, code in records if start <= t < end]
    ok = np.array([lat for lat, code in due if code == "OK"]) * 1000
    done = sum(1 for t, lat, code in records if code == "OK" and start <= t + lat < end)
    seconds = max(end - start, 1e-9)
    return {
        "start": start,
        "seconds": end - start,
        "sent": len(due),
        "throughput_rps": done / seconds,
        "p50_ms": float(np.percentile(ok, 50)) if ok.size else None,
        "p99_ms": float(np.percentile(ok, 99)) if ok.size else None,
        "max_ms": float(ok.max()) if ok.size else None,
        "errors": dict(Counter(code for _, code in due if code != "OK")),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def analyse(records: list[tuple[float, float, str]], swaps: list[dict], steady_s: float) -> list[dict]:
    """Each swap (its `publish`, `load_start` and `done` times) with its before/during/after windows."""
    rows = []
    for swap in swaps:
        before = window(records, swap["publish"] - steady_s, swap["publish"])
        during = window(records, swap["load_start"], swap["done"])
        from_publish = window(records, swap["publish"], swap["done"])
        after = window(records, swap["done"], swap["done"] + steady_s)
        # The swap's two parts, where the server logged them: loading and warming the new version,
        # then its background XLA compile and timings (absent with --no-xla). They cost serving in
        # different ways (bench/NOTES.md), so each gets its own p99.
        loaded, compiled = swap.get("loaded"), swap.get("compiled")
        loading = window(records, swap["load_start"], loaded) if loaded else None
        compiling = window(records, loaded, compiled) if loaded and compiled else None
        rows.append(
            {
                **swap,
                "poll_wait_s": swap["load_start"] - swap["publish"],
                "swap_s": swap["done"] - swap["load_start"],
                "before": before,
                "during": during,
                "from_publish": from_publish,
                "after": after,
                "p99_ratio": _ratio(during["p99_ms"], before["p99_ms"]),
                "throughput_ratio": _ratio(during["throughput_rps"], before["throughput_rps"]),
                "from_publish_p99_ratio": _ratio(from_publish["p99_ms"], before["p99_ms"]),
                "from_publish_throughput_ratio": _ratio(
                    from_publish["throughput_rps"], before["throughput_rps"]
                ),
                "after_p99_ratio": _ratio(after["p99_ms"], before["p99_ms"]),
                "loading": loading,
                "compiling": compiling,
                "loading_p99_ratio": _ratio(loading["p99_ms"], before["p99_ms"]) if loading else None,
                "compiling_p99_ratio": _ratio(compiling["p99_ms"], before["p99_ms"]) if compiling else None,
            }
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    def median(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    p99, rps = median("p99_ratio"), median("throughput_ratio")
    return {
        "p99_ratio": p99,
        "throughput_ratio": rps,
        "p99_ratios": [r["p99_ratio"] for r in rows],
        "throughput_ratios": [r["throughput_ratio"] for r in rows],
        "from_publish_p99_ratio": median("from_publish_p99_ratio"),
        "from_publish_throughput_ratio": median("from_publish_throughput_ratio"),
        "swap_s": median("swap_s"),
        "loading_p99_ratio": median("loading_p99_ratio"),
        "compiling_p99_ratio": median("compiling_p99_ratio"),
        "meets_targets": p99 is not None
        and rps is not None
        and p99 <= TARGETS["p99_ratio"]
        and rps >= TARGETS["throughput_ratio"],
    }


def per_second(records: list[tuple[float, float, str]], origin: float, swaps: list[dict]) -> list[dict]:
    """One row per second of the loop: requests due, OK answers completed, latency of those due."""
    if not records:
        return []
    last = max(t + lat for t, lat, _ in records)
    rows = []
    for second in range(int(last - origin) + 1):
        a = origin + second
        w = window(records, a, a + 1)
        phase = next(
            (f"swap to {s['version']}" for s in swaps if s["load_start"] <= a + 0.5 < s["done"]),
            next(
                (f"poll wait {s['version']}" for s in swaps if s["publish"] <= a + 0.5 < s["load_start"]), ""
            ),
        )
        rows.append(
            {
                "second": second,
                "phase": phase,
                "sent": w["sent"],
                "ok_done": round(w["throughput_rps"]),
                "errors": sum(w["errors"].values()),
                "p50_ms": None if w["p50_ms"] is None else round(w["p50_ms"], 1),
                "p99_ms": None if w["p99_ms"] is None else round(w["p99_ms"], 1),
            }
        )
    return rows


# --------------------------------------------------------------------------- the run


def open_loop(target: str, payload: Path, rate: float, timeline: Path) -> subprocess.Popen:
    """bench/loadgen.py's open loop, sending until SIGTERM (the duration is only a safety stop)."""
    from fovea.devtools.environment import subprocess_env

    argv = [
        sys.executable, str(BENCH / "loadgen.py"), "--target", target, "--payload", str(payload),
        "--mode", "open", "--rate", f"{rate:.2f}", "--warmup", "0", "--duration", "1800",
        "--timeline", str(timeline),
    ]  # fmt: skip
    loop = subprocess.Popen(
        argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert loop.stderr is not None
    first = loop.stderr.readline()  # its line once requests go out (or the start of a traceback)
    if not first.startswith("sending"):
        loop.kill()
        raise RuntimeError(f"the load generator did not start: {first}{loop.stderr.read()[-3000:]}")
    return loop


def swap_once(
    logs: LogTimes, staged: Path, model_root: Path, name: str, version: int, xla: bool, timeout: float
) -> dict:
    """Publish `version`, and wait until it serves, its predecessor is released and it is compiled."""
    published = publish(staged, model_root, version)
    load_start = logs.wait_for(published, timeout, f"loading {name} version {version} ")
    loaded = logs.wait_for(load_start, timeout, f"loaded {name} version {version} ")
    released = logs.wait_for(load_start, timeout, f"released {name} version {version - 1}")
    events = {"publish": published, "load_start": load_start, "loaded": loaded, "released": released}
    if xla:
        # A version whose compile failed serves plain: its line says so, and the swap is over too.
        events["compiled"] = logs.wait_for(
            load_start,
            timeout,
            f"{name} version {version}: XLA: compiled",
            f"{name} version {version}: XLA compile failed",
        )
    events["done"] = max(events.values())
    return {"version": version, **events}


def run(args: argparse.Namespace) -> dict:
    quick = args.quick
    name, size = ("tiny", 32) if quick else ("resnet50", 96)
    steady_s = args.steady_s or (3.0 if quick else 12.0)
    swaps_n = args.swaps or (2 if quick else 3)
    flags = args.server_flags.split() + (["--poll-interval", "1"] if quick else [])
    xla = "--no-xla" not in flags and "--no-warmup" not in flags
    work = Path(tempfile.mkdtemp(prefix="fovea-hot-swap-"))
    models, model_root = work / "models", work / "models" / name
    started = time.monotonic()
    try:
        if args.reuse_export:
            shutil.copytree(args.reuse_export / name / "1", model_root / "1")
        else:
            log(f"exporting {name} at {size} px with the trainer's export code")
            make_models(models, [name])
        staged = stage(model_root, list(range(2, swaps_n + 2)))
        payload = make_payloads(work, size)["uint8"]
        logs = LogTimes()
        server = serve(models, flags, echo=logs)
        try:
            capacity = saturated(server, payload, *((1.0, 3.0) if quick else (2.0, 6.0)))
            rate = capacity["throughput"] / 2
            load = [os.getloadavg()[0]]
            log(
                f"capacity {capacity['throughput']:.1f} req/s; open loop at {rate:.1f} req/s, {swaps_n} swaps"
            )
            machine_before = machine_load()
            timeline = work / "timeline.json"
            loop = open_loop(server.target, payload, rate, timeline)
            swaps: list[dict] = []
            stopped = ""
            try:
                time.sleep(1.0 + steady_s)  # a second to settle, then the first steady window
                for version in range(2, swaps_n + 2):
                    # Within the time budget: another swap only if one as long as the longest so far,
                    # and its steady window, still fit (a slow host measures fewer swaps, and says so).
                    longest = max((s["done"] - s["publish"] for s in swaps), default=0.0)
                    if swaps and time.monotonic() - started + longest + steady_s + 30 > args.budget_s:
                        stopped = f"{len(swaps)} of {swaps_n} swaps: the next would outrun --budget-s"
                        break
                    swap = swap_once(logs, staged[version], model_root, name, version, xla, args.swap_timeout)
                    swaps.append(swap)
                    load.append(os.getloadavg()[0])
                    log(
                        f"version {version}: polled after {swap['load_start'] - swap['publish']:.1f} s, "
                        f"swap took {swap['done'] - swap['load_start']:.1f} s"
                    )
                    time.sleep(steady_s)  # the steady window after it (and before the next)
            except (TimeoutError, KeyboardInterrupt, SystemExit) as exc:
                # Stopped mid-run: the swaps completed so far are still measured and reported.
                stopped = f"{len(swaps)} of {swaps_n} swaps: stopped ({type(exc).__name__}: {exc})"
            finally:
                loop.send_signal(signal.SIGTERM)
                _, err = loop.communicate(timeout=120)
            if stopped:
                log(stopped)
            if loop.returncode != 0:
                raise RuntimeError(f"the load generator failed:\n{err[-3000:]}")
            data = json.loads(timeline.read_text())
            machine_after = machine_load()
        finally:
            stop_server(server)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    records = sorted(zip(data["due"], data["latency_s"], data["code"], strict=True))
    info = {
        "quick": quick,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": name,
        "image_size": size,
        "server_flags": " ".join(flags),
        "capacity_rps": capacity["throughput"],
        "capacity_p99_ms": capacity["p99_ms"],
        "rate_rps": rate,
        "load_average_1min": load,
        "machine_before": machine_before,
        "machine_after": machine_after,
        "machine": machine(),
        "took_s": time.monotonic() - started,
        "stopped_early": stopped,
        # What the server said about each version: the swap's events, and its own timings.
        "server_log": [
            line
            for _, line in logs.lines
            if any(
                w in line for w in ("loading ", "loaded ", "released ", "XLA: compiled", "XLA compile failed")
            )
        ],
    }
    return report(records, swaps, steady_s, info)


def report(records: list[tuple[float, float, str]], swaps: list[dict], steady_s: float, info: dict) -> dict:
    """What a run measured (`info`), with its swaps' windows, ratios, medians and per-second rows."""
    rows = analyse(records, swaps, steady_s)
    origin = records[0][0] if records else 0.0
    return {
        **info,
        "steady_s": steady_s,
        "swaps": rows,
        "summary": summarise(rows),
        "per_second": per_second(records, origin, swaps),
        "origin": origin,
    }


# --------------------------------------------------------------------------- outputs


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(result: dict) -> list[str]:
    lines = [
        "| swap | poll wait s | swap s | p99 ms before / during / after | req/s before / during / after "
        "| errors during | p99 ratio | throughput ratio | p99 ratio loading / compiling |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["swaps"]:
        b, d, a = r["before"], r["during"], r["after"]
        lines.append(
            f"| to version {r['version']} | {r['poll_wait_s']:.1f} | {r['swap_s']:.1f} | "
            f"{_ms(b['p99_ms'])} / {_ms(d['p99_ms'])} / {_ms(a['p99_ms'])} | "
            f"{b['throughput_rps']:.1f} / {d['throughput_rps']:.1f} / {a['throughput_rps']:.1f} | "
            f"{sum(d['errors'].values())} | {_x(r['p99_ratio'])} | {_x(r['throughput_ratio'])} | "
            f"{_x(r['loading_p99_ratio'])} / {_x(r['compiling_p99_ratio'])} |"
        )
    s = result["summary"]
    lines.append(
        f"| **median** | | {_x(s['swap_s'])} | | | | **{_x(s['p99_ratio'])}** | **{_x(s['throughput_ratio'])}** | "
        f"{_x(s['loading_p99_ratio'])} / {_x(s['compiling_p99_ratio'])} |"
    )
    return lines


def docs_section(result: dict, out: Path, docs: Path) -> str:
    s = result["summary"]
    load = result["load_average_1min"]
    rel = os.path.relpath(out, docs.parent)
    verdict = "met" if s["meets_targets"] else "**missed**"
    return "\n".join(
        [
            f"## Hot swap under load ({result['model']} at {result['image_size']} px, half capacity)",
            "",
            f"Measured by `python bench/hot_swap.py` on {result['date']} ({result['took_s'] / 60:.0f} minutes). "
            f"fovea with its defaults{' plus `' + result['server_flags'] + '`' if result['server_flags'] else ''}; "
            f"capacity {result['capacity_rps']:.1f} req/s (closed loop, the better of concurrency 8 and 32), "
            f"then one open loop (Poisson, one uint8 image per request) at {result['rate_rps']:.1f} req/s "
            f"while {len(result['swaps'])} new versions were published one after another (a copy of the "
            "export renamed into place, as the trainer publishes). Steady windows of "
            f"{result['steady_s']:g} s before and after each swap; the swap counts from when the server "
            "starts loading the new version until it serves, the old one is released and the new one's XLA "
            "sizes are compiled. p99 of the requests due in each window, throughput of the OK answers "
            f"completed in it. 1-minute load average {min(load):.1f} to {max(load):.1f} on 2 cores.",
            "",
            *table(result),
            "",
            f"Targets (p99 during ≤ {TARGETS['p99_ratio']}x steady, throughput ≥ {TARGETS['throughput_ratio']}x, "
            f"medians over the swaps): {verdict}. Counted from the publish instead (the wait for the next "
            f"scan included): p99 ratio {_x(s['from_publish_p99_ratio'])}, throughput ratio "
            f"{_x(s['from_publish_throughput_ratio'])}. Per second: [{rel}/hot_swap.csv]({rel}/hot_swap.csv).",
        ]
    )


def write(result: dict, out: Path, docs: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hot_swap.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "hot_swap.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["second", "phase", "sent", "ok_done", "errors", "p50_ms", "p99_ms"]
        )
        writer.writeheader()
        writer.writerows(result["per_second"])
    swaps = [
        {
            k: r[k]
            for k in (
                "version",
                "poll_wait_s",
                "swap_s",
                "p99_ratio",
                "throughput_ratio",
                "after_p99_ratio",
                "loading_p99_ratio",
                "compiling_p99_ratio",
            )
        }
        | {
            w: {k: r[w][k] for k in ("p99_ms", "p50_ms", "throughput_rps", "errors")}
            for w in ("before", "during", "after")
        }
        for r in result["swaps"]
    ]
    merge_summary(
        out / "summary.json",
        {
            "swap": {
                "quick": result["quick"],
                "date": result["date"],
                "model": result["model"],
                "capacity_rps": result["capacity_rps"],
                "rate_rps": result["rate_rps"],
                "load_average_1min": result["load_average_1min"],
                **result["summary"],
                "swaps": swaps,
            }
        },
    )
    if docs is not None:
        write_section(docs, SECTION, docs_section(result, out, docs))
    print("\n".join(table(result)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 short swaps: a harness check")
    parser.add_argument(
        "--swaps", type=int, help="versions published one after another; default 3 (quick: 2)"
    )
    parser.add_argument(
        "--steady-s", type=float, help="steady window before and after each swap; default 12 (quick: 3)"
    )
    parser.add_argument(
        "--swap-timeout", type=float, default=300.0, help="longest wait for one swap, seconds"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=300.0,
        help="the whole run's time budget: a further swap starts only if one as long as the longest fits",
    )
    parser.add_argument(
        "--server-flags", default="", help="extra `fovea serve` flags, one string (--server-flags=--no-xla)"
    )
    parser.add_argument(
        "--reuse-export",
        type=Path,
        help="a models folder bench/make_models.py wrote: copy it, skip the export",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="leave --docs alone (quick runs always do)")
    args = parser.parse_args()
    # A stopped run (SIGTERM, a timeout) still stops its server and load generator (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args)
    write(result, args.out, None if args.quick or args.no_docs else args.docs)
    s = result["summary"]
    log(
        f"median p99 ratio {_x(s['p99_ratio'])} (target <= {TARGETS['p99_ratio']}), throughput ratio "
        f"{_x(s['throughput_ratio'])} (target >= {TARGETS['throughput_ratio']}); took {result['took_s']:.0f} s"
    )
    return 0 if s["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
