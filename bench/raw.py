"""The ceiling: in-process throughput of the served SavedModel signature at each batch size.

Runs in its own process so the server benchmark that follows gets the whole machine.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a published version folder")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per batch size")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(args.model)
    fn = loaded.signatures["serving_default"]
    height, width = fn.structured_input_signature[1]["images"].shape[1:3]
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        images = tf.constant(rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8))
        fn(images=images)  # first call of a new shape pays one-off costs
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds or len(times) < 3:
            t0 = time.perf_counter()
            fn(images=images)["probabilities"].numpy()
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "batch_size": batch,
                "calls": len(times),
                "images_per_s": batch * len(times) / sum(times),
                "p50_ms": float(np.percentile(np.array(times) * 1000, 50)),
            }
        )
        print(f"raw batch {batch:>3}: {rows[-1]['images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    json.dump({"height": int(height), "width": int(width), "rows": rows}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
