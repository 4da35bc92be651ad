"""Publish a trained Keras model as a versioned SavedModel, per the export contract.

    <models_dir>/<name>/<version>/
      saved_model.pb, variables/
      assets/labels.txt
      assets.extra/fovea.json, assets.extra/train_config.json
      report/

The version is written into a hidden temporary folder beside its final place and renamed into place,
so a server polling the folder never sees a half-written version.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

FORMAT = "fovea.export/1"
SIGNATURE_IMAGES = "serving_default"
SIGNATURE_BYTES = "serving_bytes"
INPUT_IMAGES = "images"
INPUT_BYTES = "image_bytes"
OUTPUT = "probabilities"
METADATA_FILE = "assets.extra/fovea.json"
LABELS_FILE = "assets/labels.txt"


def list_versions(model_root: str) -> list[int]:
    """Published versions under a model's folder: positive integer names, ascending."""
    if not tf.io.gfile.isdir(model_root):
        return []
    names = (n.rstrip("/") for n in tf.io.gfile.listdir(model_root))
    return sorted(int(n) for n in names if n.isdigit() and int(n) > 0)


def decode_and_resize(image_bytes: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Decode one encoded image to RGB and resize it to the model's input: uint8 [height, width, 3].

    Bilinear resize, then round and clip back to uint8. The server does exactly this to images of
    other sizes, so both paths give the same pixels.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(image, [height, width], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def build_servable(model: Any, height: int, width: int) -> tuple[tf.Module, dict]:
    """Wrap a Keras model (float32 RGB 0..255 in, probabilities out) in the two serving signatures."""
    module = tf.Module()
    module.model = model  # tracks the variables

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name=INPUT_IMAGES)])
    def serve_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = model(tf.cast(images, tf.float32), training=False)
        return {OUTPUT: tf.cast(probabilities, tf.float32)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_BYTES)])
    def serve_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.map_fn(
            lambda b: decode_and_resize(b, height, width),
            image_bytes,
            fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8),
        )
        return serve_images(images)

    module.serve_images = serve_images
    module.serve_bytes = serve_bytes
    signatures = {
        SIGNATURE_IMAGES: serve_images.get_concrete_function(),
        SIGNATURE_BYTES: serve_bytes.get_concrete_function(),
    }
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
) -> str:
    """Write the next version of `name` under `models_dir` and return its final path.

    `model` takes float32 RGB images on the 0..255 scale, [N, H, W, 3], with the backbone's
    preprocessing inside, and returns softmax probabilities [N, len(labels)].
    """
    height, width = input_size
    model_root = posixpath.join(str(models_dir), name)
    tf.io.gfile.makedirs(model_root)
    tmp = posixpath.join(model_root, f".tmp-{uuid.uuid4().hex}")
    module, signatures = build_servable(model, height, width)
    tf.saved_model.save(module, tmp, signatures=signatures)

    tf.io.gfile.makedirs(posixpath.join(tmp, "assets"))
    with tf.io.gfile.GFile(posixpath.join(tmp, LABELS_FILE), "w") as f:
        f.write("".join(f"{label}\n" for label in labels))
    if report_dir and tf.io.gfile.isdir(report_dir):
        _copy_tree(report_dir, posixpath.join(tmp, "report"))

    # Another exporter may take a version number between our listing and our rename; take the next.
    for _ in range(100):
        version = (list_versions(model_root) or [0])[-1] + 1
        meta = _metadata(name, version, labels, input_size, backbone, metrics, config)
        tf.io.gfile.makedirs(posixpath.join(tmp, "assets.extra"))
        with tf.io.gfile.GFile(posixpath.join(tmp, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        with tf.io.gfile.GFile(posixpath.join(tmp, "assets.extra/train_config.json"), "w") as f:
            json.dump(dict(config or {}), f, indent=2, sort_keys=True, default=str)
        final = posixpath.join(model_root, str(version))
        try:
            tf.io.gfile.rename(tmp, final, overwrite=False)
            return final
        except (tf.errors.AlreadyExistsError, tf.errors.FailedPreconditionError, OSError):
            if not tf.io.gfile.exists(final):
                raise
    raise RuntimeError(f"could not claim a version number under {model_root}")


def _metadata(
    name: str,
    version: int,
    labels: Sequence[str],
    input_size: tuple[int, int],
    backbone: str,
    metrics: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    height, width = input_size
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "labels": list(labels),
        "num_classes": len(labels),
        "input_size": {"height": height, "width": width},
        "backbone": backbone,
        "preprocessing": {
            "input": "RGB uint8, 0..255",
            "resize": "bilinear to input_size, then round and clip to uint8",
            "in_graph": f"{backbone} preprocess_input",
        },
        "signatures": {
            "images": {"name": SIGNATURE_IMAGES, "input": INPUT_IMAGES, "dtype": "uint8", "output": OUTPUT},
            "bytes": {"name": SIGNATURE_BYTES, "input": INPUT_BYTES, "dtype": "string", "output": OUTPUT},
        },
        "metrics": _jsonable(dict(metrics or {})),
        "config": _jsonable(dict(config or {})),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _copy_tree(src: str, dst: str) -> None:
    for dirpath, _, filenames in tf.io.gfile.walk(src):
        rel = posixpath.relpath(dirpath, src)
        target = posixpath.normpath(posixpath.join(dst, rel))
        tf.io.gfile.makedirs(target)
        for filename in filenames:
            tf.io.gfile.copy(
                posixpath.join(dirpath, filename), posixpath.join(target, filename), overwrite=True
            )
