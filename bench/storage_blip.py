"""Storage blip probe: the served model's folder renamed away under load for a while, then back.

    python bench/storage_blip.py                # the fault round's scenario: 30 s away, default poll (5 s)
    python bench/storage_blip.py --away-s 10    # shorter

Starts `fovea serve` (XLA and the open-loop queue bound off, otherwise its defaults) on the tiny benchmark model, runs two closed-loop
callers (no client retries) and a health poller (every 50 ms) through devtools' SteadyLoad, renames
MODELS/tiny out of the model folder for --away-s, renames it back, keeps the load on for --after-s, and
prints one JSON object: requests OK and failed (by code), health answers by status, the server's
fovea_model_dir_* metrics and its log lines about storage. Before the fix, this scenario gave 35 s of
UNAVAILABLE and NOT_SERVING.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# run.py puts client/, server/, trainer/ and devtools/ on sys.path when imported.
from run import log, make_models, start_server, stop_server  # noqa: E402

STORAGE_WORDS = ("storage", "unloading", "missing from", "retiring", "is gone")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--away-s", type=float, default=30.0, help="how long the model folder is away")
    parser.add_argument("--after-s", type=float, default=10.0, help="load kept on after it is back")
    parser.add_argument("--serve-flag", action="append", default=[], help="extra `fovea serve` flag")
    args = parser.parse_args()
    from fovea.devtools import prom_text  # importable once run.py has set sys.path
    from fovea.devtools.steady_load import SteadyLoad

    with tempfile.TemporaryDirectory(prefix="fovea-blip-") as tmp:
        models, away = Path(tmp) / "models", Path(tmp) / "away"
        make_models(models, ["tiny"])
        server = start_server(models, ["--no-xla", *args.serve_flag])
        try:
            with SteadyLoad(server.target, 32) as load:
                time.sleep(2.0)
                log(f"renaming {models / 'tiny'} away for {args.away_s:g}s")
                (models / "tiny").rename(away)
                time.sleep(args.away_s)
                away.rename(models / "tiny")
                log(f"back; load on for {args.after_s:g}s more")
                time.sleep(args.after_s)
            samples = prom_text.scrape(server.metrics_url)
        finally:
            stop_server(server)
        result = {
            "away_s": args.away_s,
            **load.counts.summary(),
            "metrics": {
                f"{s.name}{s.labels or ''}": s.value
                for s in samples
                if s.name.startswith(
                    ("fovea_model_dir_", "fovea_model_versions_missing", "fovea_model_loads")
                )
            },
            "storage_log": [line for line in server.output if any(w in line for w in STORAGE_WORDS)],
        }
    print(json.dumps(result, indent=2))
    return 0 if result["requests_failed"] == 0 and set(result["health_answers"]) == {"SERVING"} else 1


if __name__ == "__main__":
    sys.exit(main())
