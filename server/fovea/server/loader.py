"""The one server module that imports TensorFlow: devices, storage, SavedModel load, signature calls.

In TF Serving's words this is the loader: it turns one version folder into a warm, callable model.
The rest of the server sees numpy arrays and plain Python. Preprocessing uses exactly the ops of the
export contract's `decode_and_resize` (decode_image with channels=3 and expand_animations=False,
bilinear resize, round, clip, cast to uint8), so the server's pixels equal the bytes signature's.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from fovea.contract import (
    INPUT_IMAGES,
    LABELS_FILE,
    METADATA_FILE,
    OUTPUT,
    SIGNATURE_IMAGES,
    ModelMetadata,
    parse_labels,
)

log = logging.getLogger(__name__)


def configure_device(gpu_memory_limit_mb: int = 0) -> str:
    """Use the GPU when there is one (memory growth, or a hard cap), else the CPU; say which."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        log.info("no GPU found; serving on the CPU")
        return "CPU"
    try:
        for gpu in gpus:
            if gpu_memory_limit_mb > 0:
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_limit_mb)]
                )
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # already initialised (a second server in one process)
        log.warning("could not configure GPU memory: %s", exc)
    log.info(
        "serving on %d GPU(s): %s%s",
        len(gpus),
        ", ".join(g.name for g in gpus),
        f" (memory limit {gpu_memory_limit_mb} MiB)" if gpu_memory_limit_mb > 0 else " (memory growth)",
    )
    return "GPU"


class GFileStorage:
    """The `source.Storage` the server uses: tf.io.gfile, so the model folder may be any gfile path."""

    def listdir(self, path: str) -> list[str]:
        if not tf.io.gfile.isdir(path):
            return []
        return [n.rstrip("/") for n in tf.io.gfile.listdir(path)]

    def isdir(self, path: str) -> bool:
        return tf.io.gfile.isdir(path)

    def exists(self, path: str) -> bool:
        return tf.io.gfile.exists(path)


def read_metadata(path: str, name: str, version: int) -> ModelMetadata:
    """fovea.json of a version folder; without one (or without labels in it), labels.txt gives the labels."""
    meta_path = posixpath.join(path, METADATA_FILE)
    if tf.io.gfile.exists(meta_path):
        with tf.io.gfile.GFile(meta_path) as f:
            meta = ModelMetadata.from_json(f.read(), name=name, version=version)
    else:
        meta = ModelMetadata(name=name, version=version, labels=[], input_height=0, input_width=0)
    if not meta.labels:
        with tf.io.gfile.GFile(posixpath.join(path, LABELS_FILE)) as f:
            meta.labels = parse_labels(f.read())
    return meta


class LoadedModel:
    """One loaded SavedModel version: batched inference plus the per-image preprocessing it needs.

    It satisfies `servable.Model`; `load` is the factory the manager calls on its loader thread.
    """

    def __init__(self, path: str, name: str, version: int) -> None:
        self.metadata = read_metadata(path, name, version)
        self._loaded = tf.saved_model.load(path)
        # The concrete signature function: it never retraces, unlike the restored Keras object.
        self._signature = self._loaded.signatures[SIGNATURE_IMAGES]
        spec = self._signature.structured_input_signature[1][INPUT_IMAGES]
        height, width = spec.shape[1], spec.shape[2]
        if not self.metadata.input_height:
            self.metadata.input_height, self.metadata.input_width = int(height), int(width)
        h, w = self.metadata.input_height, self.metadata.input_width

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def decode(image_bytes: tf.Tensor) -> tf.Tensor:
            image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
            return _resize(image, h, w)

        @tf.function
        def resize(image: tf.Tensor) -> tf.Tensor:
            return _resize(image, h, w)

        self._decode = decode
        self._resize_uint8 = resize.get_concrete_function(tf.TensorSpec([None, None, 3], tf.uint8))
        self._resize_float = resize.get_concrete_function(tf.TensorSpec([None, None, 3], tf.float32))

    @property
    def num_classes(self) -> int:
        return len(self.metadata.labels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 probabilities [N, classes]."""
        return self._signature(**{INPUT_IMAGES: tf.constant(images)})[OUTPUT].numpy()

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> uint8 [H, W, 3] at the model's size; ValueError if they do not decode."""
        try:
            return self._decode(tf.constant(data)).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as exc:
            raise ValueError(str(exc).splitlines()[0] if str(exc) else "undecodable") from None

    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 or float32 [h, w, 3] (floats already clipped to 0..255) -> uint8 [H, W, 3]."""
        fn = self._resize_uint8 if image.dtype == np.uint8 else self._resize_float
        return fn(tf.constant(image)).numpy()

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run every batch size and every preprocessing path once, so the first request is not slow."""
        h, w = self.metadata.input_height, self.metadata.input_width
        for size in batch_sizes:
            out = self.predict(np.zeros((size, h, w, 3), np.uint8))
            if out.shape != (size, self.num_classes):
                raise ValueError(
                    f"signature returned shape {out.shape} for a batch of {size}; expected "
                    f"({size}, {self.num_classes}) from {self.num_classes} labels"
                )
        sample = np.full((3, 5, 3), 128, np.uint8)
        self.decode(tf.io.encode_png(sample).numpy())
        self.decode(tf.io.encode_jpeg(sample).numpy())
        self.resize(sample)
        self.resize(sample.astype(np.float32))

    def release(self) -> None:
        self._signature = None
        self._loaded = None


def load(path: str, name: str, version: int) -> LoadedModel:
    """Load one version folder (blocking: the manager calls it on its loader thread)."""
    return LoadedModel(path, name, version)


def _resize(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    image = tf.image.resize(image, [height, width], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
