"""Find the labelled images, check them, split them, and stream them with tf.data.

Layouts: DATA/<label>/* (split here, stratified and seeded) or DATA/{train,val,test}/<label>/*
(a missing val or test folder is carved out of train the same way).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fovea.contract import IMAGE_SUFFIXES

# What tf.io.decode_image reads; PIL reads more (e.g. WebP), which the pipeline could not decode.
DECODABLE_FORMATS = {"JPEG", "PNG", "BMP", "GIF"}
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """The data cannot be trained on; the message says what to fix."""


@dataclasses.dataclass
class Dataset:
    """The checked files of each split, their label indices, and what was skipped."""

    labels: list[str]
    files: dict[str, list[str]]  # split -> paths
    targets: dict[str, list[int]]  # split -> label indices
    skipped: list[dict[str, str]]  # {"path", "reason"}
    layout: str

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {
                label: int(np.sum(np.asarray(self.targets[split]) == i))
                for i, label in enumerate(self.labels)
            }
            for split in SPLITS
        }

    def class_weights(self) -> dict[int, float]:
        """Inverse frequency in the training split, normalised so a balanced set gets 1.0 everywhere."""
        counts = np.bincount(np.asarray(self.targets["train"]), minlength=len(self.labels)).astype(float)
        total = counts.sum()
        return {i: float(total / (len(self.labels) * c)) for i, c in enumerate(counts) if c > 0}


def has_images(data_dir: str | Path) -> bool:
    """Whether any file with an image extension lies anywhere under data_dir."""
    root = Path(data_dir)
    if not root.is_dir():
        return False
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*") if p.is_file())


def check_image(path: str) -> str | None:
    """None when TensorFlow will decode the file, else why not. Cheap: a reduced-size decode."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()  # structure and checksums, without decoding
        if fmt not in DECODABLE_FORMATS:
            return f"unsupported image format {fmt}"
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG decodes at 1/2..1/8 scale: catches truncation, fast
            im.load()
    except Exception as exc:  # PIL raises many types for bad files; any of them means skip
        return f"not a readable image ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def _list_class_folder(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    files, skipped = [], []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(str(p))
        else:
            skipped.append({"path": str(p), "reason": f"not an image file extension ({p.suffix or 'none'})"})
    return files, skipped


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _stratified_split(
    files: Sequence[str], fractions: Sequence[float], rng: np.random.Generator
) -> list[list[str]]:
    """Split one class's files into len(fractions)+1 parts; each held-out part gets >= 1 file if it can."""
    order = [files[i] for i in rng.permutation(len(files))]
    n = len(order)
    sizes = [round(n * f) for f in fractions]
    for i in range(len(sizes)):
        if sizes[i] == 0 and n - sum(sizes) > 1:
            sizes[i] = 1
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    return [order[start:], *parts]


def load_dataset(
    data_dir: str | Path, *, val_split: float = 0.1, test_split: float = 0.1, seed: int = 0, workers: int = 8
) -> Dataset:
    """Discover, check and split the images; raise DataError with what to fix when it cannot work."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    rng = np.random.default_rng(seed)
    presplit = (root / "train").is_dir()
    skipped: list[dict[str, str]] = []

    def scan(folder: Path, where: str) -> dict[str, list[str]]:
        classes = _class_folders(folder)
        found = {}
        for c in classes:
            files, bad = _list_class_folder(c)
            skipped.extend(bad)
            found[c.name] = files
        loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if loose and not classes:
            raise DataError(
                f"{where} holds images but no class folders: put each class's images in {where}/<label>/"
            )
        return found

    if presplit:
        per_split = {s: scan(root / s, str(root / s)) for s in SPLITS if (root / s).is_dir()}
        labels = sorted(per_split["train"])
        for split, found in per_split.items():
            extra = sorted(set(found) - set(labels))
            if extra:
                raise DataError(
                    f"{root / split} has classes not in {root / 'train'}: {', '.join(extra)}; "
                    "add them to train or remove them"
                )
        layout = "DATA/{train,val,test}/<label>/*"
    else:
        per_split = {"train": scan(root, str(root))}
        labels = sorted(per_split["train"])
        layout = "DATA/<label>/*"

    if len(labels) < 2:
        found = f"found {len(labels)} ({', '.join(labels)})" if labels else "found none"
        where = root / "train" if presplit else root
        raise DataError(
            f"need at least 2 class folders under {where}, {found}: add a folder of images per class"
        )

    # Check every candidate file once, in parallel (PIL releases the GIL while decoding).
    candidates = sorted({f for found in per_split.values() for files in found.values() for f in files})
    with ThreadPoolExecutor(max_workers=max(1, min(workers, (os.cpu_count() or 1) * 4))) as pool:
        problems = dict(zip(candidates, pool.map(check_image, candidates), strict=True))
    for path, reason in problems.items():
        if reason:
            skipped.append({"path": path, "reason": reason})

    def good(files: list[str]) -> list[str]:
        return [f for f in files if not problems.get(f)]

    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    targets: dict[str, list[int]] = {s: [] for s in SPLITS}
    for index, label in enumerate(labels):
        train_files = good(per_split["train"].get(label, []))
        if not train_files:
            where = (root / "train" / label) if presplit else (root / label)
            raise DataError(
                f"class {label!r} has no readable images in {where}: add images or remove the folder"
            )
        held: dict[str, list[str]] = {}
        carve = [s for s in ("val", "test") if s not in per_split]
        for split in ("val", "test"):
            if split in per_split:
                held[split] = good(per_split[split].get(label, []))
        if carve:
            fractions = [val_split if s == "val" else test_split for s in carve]
            train_files, *parts = _stratified_split(train_files, fractions, rng)
            held.update(dict(zip(carve, parts, strict=True)))
            if not train_files:
                raise DataError(f"class {label!r} has too few images to split; add images to it")
        for split, split_files in (("train", train_files), *held.items()):
            files[split].extend(split_files)
            targets[split].extend([index] * len(split_files))

    for split in SPLITS:
        if not files[split]:
            smallest = min(labels, key=lambda lb: len(per_split["train"].get(lb, [])))
            hint = (
                f"add images to {root / split}/<label>/"
                if presplit and split in per_split
                else f"add images (class {smallest!r} has the fewest; 3 per class is the minimum for an "
                f"80/10/10 split) or provide {root}/{split}/<label>/"
            )
            raise DataError(f"the {split} split is empty: {hint}")

    # Shuffle the training list once (seeded) so classes interleave even before the stream shuffles.
    order = rng.permutation(len(files["train"]))
    files["train"] = [files["train"][i] for i in order]
    targets["train"] = [targets["train"][i] for i in order]
    return Dataset(labels=labels, files=files, targets=targets, skipped=skipped, layout=layout)


def make_stream(
    files: Sequence[str],
    targets: Sequence[int],
    *,
    num_classes: int,
    input_size: int,
    batch_size: int,
    training: bool,
    seed: int,
    cache: bool,
    repeat: bool = False,
):
    """A tf.data pipeline: parallel decode+resize (the export's own resize), cache, shuffle, batch, prefetch.

    Yields (float32 images 0..255 [B, H, W, 3], one-hot float32 labels [B, classes]). Files that still
    fail to decode are dropped rather than stopping training (they were checked up front already).
    """
    import tensorflow as tf
    from fovea.trainer.export import decode_and_resize

    autotune = tf.data.AUTOTUNE

    def load(path: tf.Tensor, target: tf.Tensor):
        image = decode_and_resize(tf.io.read_file(path), input_size, input_size)
        image.set_shape([input_size, input_size, 3])
        return image, tf.one_hot(target, num_classes)

    ds = tf.data.Dataset.from_tensor_slices((list(files), list(targets)))
    ds = ds.map(load, num_parallel_calls=autotune, deterministic=True)
    ds = ds.ignore_errors()
    if cache:
        ds = ds.cache()  # uint8 in memory: 4x smaller than float32
    if training:
        ds = ds.shuffle(min(len(files), 10_000), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
    options = tf.data.Options()
    # Every worker reads the whole file list and keeps its share of each batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(autotune)


def fits_in_cache(num_images: int, input_size: int, limit_mb: int) -> bool:
    return num_images * input_size * input_size * 3 <= limit_mb * 1024 * 1024
