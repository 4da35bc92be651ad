"""The ceiling: in-process throughput of the served SavedModel signature at each batch size.

Runs in its own process so the server benchmark that follows gets the whole machine. Each batch size
is measured twice: the signature as exported, and XLA-compiled (`tf.function(jit_compile=True)`
around it, as the server's loader serves it where faster), alternating in short rounds so that
anything else on the machine slows both alike. Prints one JSON object on stdout.

With `--serve` it loads and compiles every batch size once, prints `{"ready": true}`, then measures
on demand: each line `BATCH SECONDS` on stdin gets one JSON row on stdout. bench/interleaved.py keeps
one such process idle beside the servers and measures the ceiling as one more window of a block, so
the ceiling a ratio divides by was taken seconds from the server's window, not minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def calls_at(fn, compiled, batch: int, height: int, width: int, xla: bool) -> dict[str, Callable[[], object]]:
    """The plain (and XLA-compiled) call at one batch size, each called twice: the first call of a
    new shape pays one-off costs (XLA compiles here)."""
    import numpy as np
    import tensorflow as tf
    from fovea import contract

    rng = np.random.default_rng(batch)
    images = tf.constant(rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8))
    calls = {"plain": lambda: fn(images=images)[contract.OUTPUT].numpy()}
    if xla:
        concrete = compiled.get_concrete_function(tf.TensorSpec([batch, height, width, 3], tf.uint8))
        calls["xla"] = lambda: concrete(images).numpy()
    for call in calls.values():
        call()
        call()
    return calls


def timed(calls: dict[str, Callable[[], object]], batch: int, seconds: float) -> dict:
    """Alternate the calls (so both see the same machine) for `seconds` each, at least 3 calls each."""
    import numpy as np

    times: dict[str, list[float]] = {k: [] for k in calls}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds * len(calls) or min(map(len, times.values())) < 3:
        for kind, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[kind].append(time.perf_counter() - t0)
    row: dict = {"batch_size": batch}
    for kind, ts in times.items():
        prefix = "" if kind == "plain" else "xla_"
        row[f"{prefix}calls"] = len(ts)
        row[f"{prefix}images_per_s"] = batch * len(ts) / sum(ts)
        row[f"{prefix}p50_ms"] = float(np.percentile(np.array(ts) * 1000, 50))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a published version folder")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per batch size and kind")
    parser.add_argument("--no-xla", action="store_true", help="only the signature as exported")
    parser.add_argument(
        "--serve", action="store_true", help="measure on demand: `BATCH SECONDS` lines on stdin"
    )
    args = parser.parse_args()

    import tensorflow as tf
    from fovea import contract

    loaded = tf.saved_model.load(args.model)
    fn = loaded.signatures[contract.SIGNATURE_IMAGES]
    height, width = fn.structured_input_signature[1][contract.INPUT_IMAGES].shape[1:3]
    compiled = tf.function(lambda images: fn(images=images)[contract.OUTPUT], jit_compile=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.serve:
        calls = {b: calls_at(fn, compiled, b, height, width, not args.no_xla) for b in batches}
        print(json.dumps({"ready": True, "height": int(height), "width": int(width)}), flush=True)
        for line in sys.stdin:
            batch, seconds = line.split()
            b = int(batch)
            for call in calls[b].values():  # one warm call each: the process sat idle until now
                call()
            print(json.dumps(timed(calls[b], b, float(seconds))), flush=True)
        return 0
    rows = []
    for batch in batches:
        row = timed(calls_at(fn, compiled, batch, height, width, not args.no_xla), batch, args.seconds)
        rows.append(row)
        print(
            f"raw batch {batch:>3}: {row['images_per_s']:.1f} img/s"
            + (f", XLA {row['xla_images_per_s']:.1f} img/s" if "xla_images_per_s" in row else ""),
            file=sys.stderr,
            flush=True,
        )
    json.dump({"height": int(height), "width": int(width), "rows": rows}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
