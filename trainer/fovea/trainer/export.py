"""Publish a trained Keras model as a versioned SavedModel, per the export contract (fovea.contract).

The version is written into a hidden temporary folder beside its final place and renamed into place,
so a server polling the folder never sees a half-written version. On a local or POSIX file system the
rename is atomic. An object store (gs://, s3://) has no rename: tf.io.gfile would copy object by object
in name order, saved_model.pb (the contract's mark of a complete version) before variables/. There the
exporter copies every other file first and saved_model.pb last, then deletes the temporary folder; see
docs/deploy.md, "Publishing on object stores".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
from fovea import contract

# A temporary export folder untouched this long is left over from a killed exporter, wherever it ran.
STALE_TMP_SECONDS = 6 * 3600


def list_versions(model_root: str) -> list[int]:
    """Every version folder under a model's folder, ascending: the numbers already taken."""
    if not tf.io.gfile.isdir(model_root):
        return []
    return contract.versions_in(tf.io.gfile.listdir(model_root))


def decode_and_resize(image_bytes: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Decode one encoded image to RGB and resize it to the model's input: uint8 [height, width, 3].

    Bilinear resize, then round and clip back to uint8. The server does exactly this to images of
    other sizes, so both paths give the same pixels.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(image, [height, width], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def build_servable(model: Any, height: int, width: int, temperature: float = 1.0) -> tuple[tf.Module, dict]:
    """Wrap a Keras model (float32 RGB 0..255 in, probabilities out) in the two serving signatures.

    A temperature other than 1 is folded in: softmax(log(p) / T), exact temperature scaling since
    log-softmax is the logits up to a constant. It wraps the export, not the variables, so a retrain
    from this version (parent.py copies the variables kept under contract.WEIGHTS) starts uncalibrated.
    """
    module = tf.Module()
    # Track the variables, not the Keras object (which would save every layer's functions; see
    # contract.WEIGHTS): the signatures below capture them, and parent.py finds them by name.
    setattr(module, contract.WEIGHTS, list(model.variables))
    inverse_t = tf.constant(1.0 / temperature, tf.float32)

    @tf.function(
        input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name=contract.INPUT_IMAGES)]
    )
    def serve_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32)
        if temperature != 1.0:
            probabilities = tf.nn.softmax(tf.math.log(tf.maximum(probabilities, 1e-12)) * inverse_t, axis=-1)
        return {contract.OUTPUT: probabilities}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=contract.INPUT_BYTES)])
    def serve_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.map_fn(
            lambda b: decode_and_resize(b, height, width),
            image_bytes,
            fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8),
        )
        return serve_images(images)

    module.serve_images = serve_images
    module.serve_bytes = serve_bytes
    # The functions, not concrete functions traced here: tf.saved_model.save traces the attributes
    # again in its save context, so concrete functions from get_concrete_function() would be saved
    # beside those, a second copy of the whole network that every server load rebuilds.
    signatures = {contract.SIGNATURE_IMAGES: serve_images, contract.SIGNATURE_BYTES: serve_bytes}
    return module, signatures


def export_model(
    model: Any,
    *,
    models_dir: str,
    name: str,
    labels: Sequence[str],
    input_size: tuple[int, int],
    backbone: str,
    metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    report_dir: str | None = None,
    parent: str = "",
    calibration: Mapping[str, Any] | None = None,
) -> str:
    """Write the next version of `name` under `models_dir` and return its final path.

    `model` takes float32 RGB images on the 0..255 scale, [N, H, W, 3], with the backbone's
    preprocessing inside, and returns softmax probabilities [N, len(labels)]. `calibration`
    (calibration.summarise) is recorded in fovea.json; its temperature is folded into the signatures.
    """
    height, width = input_size
    model_root = posixpath.join(str(models_dir), name)
    tf.io.gfile.makedirs(model_root)
    remove_stale_temporaries(model_root)
    tmp = posixpath.join(model_root, _temporary_name())
    try:
        temperature = float((calibration or {}).get("temperature") or 1.0)
        module, signatures = build_servable(model, height, width, temperature)
        tf.saved_model.save(module, tmp, signatures=signatures)

        tf.io.gfile.makedirs(posixpath.join(tmp, "assets"))
        with tf.io.gfile.GFile(posixpath.join(tmp, contract.LABELS_FILE), "w") as f:
            f.write(contract.format_labels(labels))
        if report_dir and tf.io.gfile.isdir(report_dir):
            _copy_tree(report_dir, posixpath.join(tmp, contract.REPORT_DIR))
        tf.io.gfile.makedirs(posixpath.join(tmp, posixpath.dirname(contract.METADATA_FILE)))
        with tf.io.gfile.GFile(posixpath.join(tmp, contract.TRAIN_CONFIG_FILE), "w") as f:
            json.dump(dict(config or {}), f, indent=2, sort_keys=True, default=str)
        meta = contract.ModelMetadata(
            name=name,
            version=0,
            labels=list(labels),
            input_height=height,
            input_width=width,
            backbone=backbone,
            metrics=dict(metrics or {}),
            config=dict(config or {}),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            parent=parent,
            calibration=dict(calibration or {}),
        )

        # Another exporter may take a version number between our listing and our rename; take the next.
        for _ in range(100):
            version = (list_versions(model_root) or [0])[-1] + 1
            with tf.io.gfile.GFile(posixpath.join(tmp, contract.METADATA_FILE), "w") as f:
                f.write(meta.replace(version=version).to_json())
            final = contract.version_path(model_root, version)
            try:
                if renames_atomically(model_root):
                    tf.io.gfile.rename(tmp, final, overwrite=False)
                else:
                    _publish_by_copy(tmp, final)
                return final
            except (tf.errors.AlreadyExistsError, tf.errors.FailedPreconditionError, OSError):
                if not tf.io.gfile.exists(final):
                    raise
        raise RuntimeError(f"could not claim a version number under {model_root}")
    except BaseException:
        # A failed export (a full disk, a bad model) leaves no temporary behind; a killed one does, and
        # the next export or training run removes it (remove_stale_temporaries).
        with contextlib.suppress(tf.errors.OpError, OSError):
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.rmtree(tmp)
        raise


def renames_atomically(path: str) -> bool:
    """Local and mounted file systems rename a folder in one step; object stores copy it."""
    return "://" not in path or path.startswith("file://")


def _publish_by_copy(tmp: str, final: str) -> None:
    """Publish on an object store: every file but saved_model.pb, then saved_model.pb, then clean up.

    A poller that lists the version before saved_model.pb lands skips it as incomplete; once it is
    there, everything else already is. Claiming the number is not atomic here (no create-if-absent):
    the exporter refuses a number whose folder already exists, and one trainer per model is the rule.
    """
    if tf.io.gfile.exists(final):
        raise tf.errors.AlreadyExistsError(None, None, f"{final} exists")
    files = []
    for dirpath, _, filenames in tf.io.gfile.walk(tmp):
        files += [posixpath.relpath(posixpath.join(dirpath, f), tmp) for f in filenames]
    files.sort(key=lambda rel: rel == contract.SAVED_MODEL_FILE)  # the mark of completeness goes last
    for rel in files:
        tf.io.gfile.makedirs(posixpath.dirname(posixpath.join(final, rel)))
        tf.io.gfile.copy(posixpath.join(tmp, rel), posixpath.join(final, rel), overwrite=False)
    tf.io.gfile.rmtree(tmp)


def read_metadata(version_dir: str) -> contract.ModelMetadata:
    """A published version's fovea.json (ValueError when it is missing or malformed)."""
    path = posixpath.join(version_dir, contract.METADATA_FILE)
    try:
        with tf.io.gfile.GFile(path) as f:
            text = f.read()
    except tf.errors.NotFoundError:
        raise ValueError(
            f"{version_dir} is not a published fovea version: no {contract.METADATA_FILE}"
        ) from None
    return contract.ModelMetadata.from_json(text)


def version_of_run(model_root: str, run_id: str) -> str | None:
    """The published version a training run already produced (its fovea.json names the run), if any."""
    if not run_id:
        return None
    for version in reversed(list_versions(model_root)):
        path = contract.version_path(model_root, version)
        try:
            if read_metadata(path).metrics.get("run_id") == run_id:
                return path
        except ValueError:
            continue
    return None


def _temporary_name() -> str:
    # Host and pid in the name let a later exporter on the same host tell a dead exporter's folder.
    return f"{contract.TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove_stale_temporaries(
    model_root: str, max_age: float = STALE_TMP_SECONDS, *, model_locked: bool = False
) -> list[str]:
    """Delete temporary export folders left by killed exporters; returns the names removed.

    A folder is stale when its exporter ran on this host and is no longer alive, or, wherever it ran,
    when nothing in it changed for max_age seconds (an export writes for seconds to minutes). With
    `model_locked` (the caller holds the model's training lock, so no other trainer can be exporting
    it) every folder whose exporter is not alive on this host is stale, another host's included: a
    killed Kubernetes pod's restart runs on a new host. A live exporter's folder on this host is
    never touched.
    """
    removed = []
    host = socket.gethostname()
    for entry in tf.io.gfile.listdir(model_root):
        entry = entry.rstrip("/")
        if not entry.startswith(contract.TEMP_PREFIX):
            continue
        path = posixpath.join(model_root, entry)
        owner_host, _, rest = entry[len(contract.TEMP_PREFIX) :].rpartition("-")[0].rpartition("-")
        here = owner_host == host and rest.isdigit()
        if here and _pid_alive(int(rest)):
            continue
        if here or model_locked or _idle_seconds(path) > max_age:
            try:
                tf.io.gfile.rmtree(path)
                removed.append(entry)
            except tf.errors.OpError:
                pass  # another exporter's cleanup got there first
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _idle_seconds(path: str) -> float:
    newest = 0.0
    try:
        for dirpath, _, filenames in tf.io.gfile.walk(path):
            for p in [dirpath, *(posixpath.join(dirpath, f) for f in filenames)]:
                newest = max(newest, tf.io.gfile.stat(p).mtime_nsec / 1e9)
    except tf.errors.OpError:
        return 0.0  # vanished or unreadable: not ours to judge
    return time.time() - newest


def _copy_tree(src: str, dst: str) -> None:
    for dirpath, _, filenames in tf.io.gfile.walk(src):
        rel = posixpath.relpath(dirpath, src)
        target = posixpath.normpath(posixpath.join(dst, rel))
        tf.io.gfile.makedirs(target)
        for filename in filenames:
            tf.io.gfile.copy(
                posixpath.join(dirpath, filename), posixpath.join(target, filename), overwrite=True
            )
