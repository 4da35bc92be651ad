"""The trainer's input pipeline, measured: fovea's tf.data stream against Keras' ImageDataGenerator.

Same images, same machine, same augmentation (the seed tutorial's: rotation 30, shifts and zoom 0.2,
horizontal flips, brightness), same output (float32 batches at the model's input size):

- `fovea tf.data`: data.make_stream (parallel decode and resize, cache, shuffle, batch, prefetch) with
  the model's own augmentation layers applied to each batch, as they run inside fit. Epoch 1 decodes
  the files; later epochs come from the in-memory cache, as they do in training.
- `ImageDataGenerator`: flow_from_directory with the same settings, one batch at a time.

Then the step-time split: a real train step (ResNet50 from random weights, as the demo trains) fed by
each pipeline as it trains (fovea's model augments inside the step, so its stream delivers plain
batches; ImageDataGenerator augments the input), timing how long each step waited for its batch and
how long the step itself took.

    python bench/trainer_pipeline.py                 # about 5 minutes on 2 cores
    python bench/trainer_pipeline.py --quick         # seconds: checks the harness

Writes bench/results/trainer_pipeline.{csv,md,json}; docs/benchmarks.md quotes the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("client", "server", "trainer")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The seed tutorial's ImageDataGenerator settings; fovea's 'photo' preset has the same values.
IDG_SETTINGS = dict(
    rotation_range=30, width_shift_range=0.2, height_shift_range=0.2, zoom_range=0.2,
    horizontal_flip=True, brightness_range=(0.8, 1.2), fill_mode="reflect",
)  # fmt: skip


# fovea augments inside the model, so on a GPU the augmentation runs on the device and the CPU only has
# to deliver this stream; on a CPU both share the cores.
STREAM_ONLY = "fovea tf.data, stream only"


def fovea_batches(files, targets, classes, size, batch, epochs, augmented=True):
    """(images, labels) batches of fovea's stream, augmented as in fit; yields per epoch.

    augmented=False: the stream alone, as fit receives it (the model augments inside the step).
    """
    import tensorflow as tf
    from fovea.trainer import data
    from fovea.trainer.config import TrainConfig
    from fovea.trainer.model import augmentation_layers

    layers = augmentation_layers(TrainConfig(augment="photo" if augmented else "none").augmentation(), seed=0)

    @tf.function
    def augment(x):
        for layer in layers:
            x = layer(x, training=True)
        return x

    augment(tf.zeros([batch, size, size, 3]))  # traced before the clock starts, as fit does once
    stream = data.make_stream(
        files, targets, num_classes=classes, input_size=size, batch_size=batch, training=True, seed=0,
        cache=True,
    )  # fmt: skip
    for _ in range(epochs):
        yield ((augment(x), y) for x, y in stream)


def idg_batches(folder, size, batch, epochs, steps):
    from tf_keras.preprocessing.image import ImageDataGenerator

    flow = ImageDataGenerator(**IDG_SETTINGS).flow_from_directory(
        str(folder), target_size=(size, size), batch_size=batch, class_mode="categorical", seed=0
    )
    for _ in range(epochs):
        yield (flow[i % len(flow)] for i in range(steps))


def throughput(epochs_iter) -> list[tuple[int, float]]:
    """(images, seconds) per epoch."""
    out = []
    for epoch in epochs_iter:
        n, start = 0, time.perf_counter()
        for x, _ in epoch:
            n += int(x.shape[0])
            _ = x.numpy() if hasattr(x, "numpy") else x  # the batch is really made
        out.append((n, time.perf_counter() - start))
    return out


def step_split(model, batches, steps: int) -> tuple[float, float]:
    """(mean seconds waiting for a batch, mean seconds in the train step) over `steps` steps."""
    it = iter(batches)
    x, y = next(it)
    model.train_on_batch(x, y)  # trace and warm up
    wait = compute = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        model.train_on_batch(x, y)
        compute += time.perf_counter() - t1
        wait += t1 - t0
    return wait / steps, compute / steps


def _repeat(epochs_iter):
    for epoch in epochs_iter:
        yield from epoch


def machine() -> str:
    import tensorflow as tf

    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
        f"tensorflow {tf.__version__}; load average at the start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def busiest_processes(count: int = 5) -> str:
    """What else was using the CPU when the run started (the machine may be shared)."""
    import subprocess

    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,args", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rows = [line.strip().split(None, 1) for line in out.splitlines() if line.strip()]
    return "; ".join(f"{cpu}% {args[:70]}" for cpu, args in (r for r in rows[:count] if len(r) == 2))


def write_markdown(out: Path, rows: list[dict], summary: dict) -> None:
    """trainer_pipeline.md from the rows and the summary (--render rewrites it from the saved files)."""
    table = [
        "| pipeline | measure | images/s | wait per step | train step | share waiting |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        wait = f"{r['wait_ms']} ms" if "wait_ms" in r else "-"
        step = f"{r['step_ms']} ms" if "step_ms" in r else "-"
        share = f"{r['wait_share']:.1%}" if "wait_share" in r else "-"
        table.append(
            f"| {r['pipeline']} | {r['measure']} | {r.get('images_per_s', '-')} | {wait} | {step} | {share} |"
        )
    (out / "trainer_pipeline.md").write_text(
        f"Measured by `python bench/trainer_pipeline.py` on {summary['date']}: {summary['images']} JPEGs of "
        f"{summary['stored_size']} px, 4 classes, to {summary['input_size']} px float32 batches of "
        f"{summary['batch']}, augmented.\n\n"
        f"Machine: {summary['machine']}.\n\n"
        f"Busiest processes at the start (the machine is shared): {summary['busiest_processes_at_start']}.\n\n"
        + "\n".join(table)
        + "\n\n"
        f"fovea ÷ ImageDataGenerator: {summary['speedup_cached']}x from the cache (every epoch after the "
        f"first), {summary['speedup_first_epoch']}x on the first epoch; the stream alone (what the CPU "
        f"delivers when the model augments on a GPU): {summary['stream_only_speedup']}x (target: at least 3x).\n"
    )


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness in seconds")
    parser.add_argument("--images", type=int, default=480, help="images in the set (4 classes)")
    parser.add_argument("--size", type=int, default=224, help="the model's input size, px")
    parser.add_argument("--image-size", type=int, default=256, help="the stored images' size, px (JPEG)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--step-size", type=int, default=96, help="input size of the train-step split, px")
    parser.add_argument("--steps", type=int, default=12, help="train steps timed per pipeline")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md from the saved .csv and .json"
    )
    args = parser.parse_args()
    if args.render:
        out = Path(args.out)
        with (out / "trainer_pipeline.csv").open() as f:
            rows = [{k: _number(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        write_markdown(out, rows, json.loads((out / "trainer_pipeline.json").read_text()))
        return 0
    if args.quick:
        args.images, args.size, args.image_size, args.batch, args.step_size, args.steps = 32, 32, 40, 8, 32, 2

    from fovea.trainer import data
    from fovea.trainer.config import TrainConfig
    from fovea.trainer.demo_data import generate
    from PIL import Image

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    info = machine()
    others = busiest_processes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fovea-pipeline-") as tmp:
        folder = Path(tmp) / "images"
        generate(folder, classes=4, per_class=args.images // 4, size=args.image_size, seed=0)
        for png in folder.rglob("*.png"):  # JPEG, as photos come
            Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=90)
            png.unlink()
        ds = data.load_dataset(folder, val_split=0.1, test_split=0.1)
        files = ds.files["train"] + ds.files["val"] + ds.files["test"]
        targets = ds.targets["train"] + ds.targets["val"] + ds.targets["test"]
        steps = -(-len(files) // args.batch)

        for name, epochs in (
            ("fovea tf.data", fovea_batches(files, targets, 4, args.size, args.batch, 3)),
            (STREAM_ONLY, fovea_batches(files, targets, 4, args.size, args.batch, 3, augmented=False)),
            ("ImageDataGenerator", idg_batches(folder, args.size, args.batch, 2, steps)),
        ):
            for epoch, (n, seconds) in enumerate(throughput(epochs), start=1):
                rows.append(dict(pipeline=name, measure=f"epoch {epoch}", images=n, seconds=round(seconds, 3),
                                 images_per_s=round(n / seconds, 1)))  # fmt: skip
                print(f"{name:20s} epoch {epoch}: {n / seconds:8.1f} images/s", flush=True)

        from fovea.trainer.model import build_model

        # As each trains: fovea's model augments inside its step; ImageDataGenerator augments the input.
        for name, augment, batches in (
            ("fovea tf.data", "photo",
             _repeat(fovea_batches(files, targets, 4, args.step_size, args.batch, 100, augmented=False))),
            ("ImageDataGenerator", "none", _repeat(idg_batches(folder, args.step_size, args.batch, 100, steps))),
        ):  # fmt: skip
            cfg = TrainConfig(data=tmp, models=tmp, backbone="resnet50", weights="none", input_size=args.step_size,
                              augment=augment, batch_size=args.batch).resolved()  # fmt: skip
            model, _ = build_model(cfg, 4)
            model.compile(optimizer="adam", loss="categorical_crossentropy")
            wait, compute = step_split(model, batches, args.steps)
            rows.append(dict(pipeline=name, measure=f"train step at {args.step_size} px", images=args.batch,
                             seconds=round(wait + compute, 4), wait_ms=round(wait * 1e3, 1),
                             step_ms=round(compute * 1e3, 1), wait_share=round(wait / (wait + compute), 3)))  # fmt: skip
            print(f"{name:20s} step: waited {wait * 1e3:.1f} ms, computed {compute * 1e3:.1f} ms", flush=True)

    fovea_cached = max(
        r["images_per_s"] for r in rows if r["pipeline"] == "fovea tf.data" and "epoch" in r["measure"]
    )
    fovea_first = next(
        r["images_per_s"] for r in rows if r["pipeline"] == "fovea tf.data" and r["measure"] == "epoch 1"
    )
    idg = max(
        r["images_per_s"] for r in rows if r["pipeline"] == "ImageDataGenerator" and "epoch" in r["measure"]
    )
    stream = max(r["images_per_s"] for r in rows if r["pipeline"] == STREAM_ONLY)
    summary = {
        "date": started, "machine": info, "images": len(files), "input_size": args.size,
        "stored_size": args.image_size, "batch": args.batch, "quick": args.quick,
        "busiest_processes_at_start": others,
        "speedup_cached": round(fovea_cached / idg, 2), "speedup_first_epoch": round(fovea_first / idg, 2),
        "stream_only_speedup": round(stream / idg, 2),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["pipeline", "measure", "images", "seconds", "images_per_s", "wait_ms", "step_ms", "wait_share"]
    with (out / "trainer_pipeline.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "trainer_pipeline.json").write_text(json.dumps(summary, indent=2))
    write_markdown(out, rows, summary)
    print(f"speedup: {summary['speedup_cached']}x cached, {summary['speedup_first_epoch']}x first epoch")
    print(out / "trainer_pipeline.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
