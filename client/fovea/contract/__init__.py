"""The export contract between the trainer and the server: one home, no TensorFlow.

The trainer writes what this module describes, the server, client and demo read it; none of them
spells a file name, a signature name or the version-folder rule anywhere else. It lives in the base
install so that any consumer of a published model can read its metadata without TensorFlow.

    <models_dir>/<model_name>/<version>/     version: a positive integer folder, as TF Serving lays it out
      saved_model.pb, variables/               written to a hidden ".tmp-*" folder, then renamed into place
      assets/labels.txt                        one label per line, index order
      assets.extra/fovea.json                  ModelMetadata (below)
      assets.extra/train_config.json           the trainer's full configuration
      report/                                  metrics.json, plots, index.html

Paths here are plain strings joined with "/", so they work for local folders and for any
`tf.io.gfile` URL (gs://, s3://) alike; the I/O itself stays with the caller.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# -- layout -------------------------------------------------------------------------------------

SAVED_MODEL_FILE = "saved_model.pb"  # its presence marks a complete version
LABELS_FILE = "assets/labels.txt"
METADATA_FILE = "assets.extra/fovea.json"
TRAIN_CONFIG_FILE = "assets.extra/train_config.json"
REPORT_DIR = "report"
TEMP_PREFIX = ".tmp-"  # exports are written here first; hidden, never a version

# -- signatures ---------------------------------------------------------------------------------

SIGNATURE_IMAGES = "serving_default"  # uint8 [N, H, W, 3] -> float32 probabilities [N, classes]
SIGNATURE_BYTES = "serving_bytes"  # encoded image bytes [N] -> the same
INPUT_IMAGES = "images"
INPUT_BYTES = "image_bytes"
OUTPUT = "probabilities"
# The SavedModel's root keeps the model's variables as a list under this name (names such as
# "conv1_conv/kernel:0" kept), for a retrain that starts from a version. Not the Keras object: that
# saves every layer's call functions too (714 for ResNet50 against 12), which a server loads for
# nothing and a hot swap pays for (10 s against 3 s to load ResNet50, and the old version's garbage).
# Versions exported before keep the Keras object under MODEL_OBJECT_OLD.
WEIGHTS = "weights"
MODEL_OBJECT_OLD = "model"

# -- inputs -------------------------------------------------------------------------------------

# What tf.io.decode_image reads; the trainer's data loader and the client's folder walk both use it.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
BACKBONES = ("resnet50", "vgg16", "vgg19")

# -- versions -----------------------------------------------------------------------------------


def version_of(folder_name: str) -> int | None:
    """The version a folder name stands for (a positive integer, "/"-suffix tolerated), else None.

    Hidden folders (".tmp-*", half-written exports) and anything else are not versions.
    """
    name = folder_name.rstrip("/")
    if not name.isascii() or not name.isdigit():
        return None
    version = int(name)
    return version if version > 0 else None


def versions_in(folder_names: Iterable[str]) -> list[int]:
    """Every version folder among `folder_names`, ascending (complete or not)."""
    return sorted({v for n in folder_names if (v := version_of(n)) is not None})


def published_versions(
    model_root: str, listdir: Callable[[str], Iterable[str]], exists: Callable[[str], bool]
) -> list[int]:
    """The complete versions under a model's folder: version folders that hold saved_model.pb.

    `listdir` and `exists` are the caller's file system (os or tf.io.gfile); they may raise, and a
    caller that must tell "no versions" from "storage failed" gets the exception, never [].
    """
    return [
        v for v in versions_in(listdir(model_root)) if exists(version_path(model_root, v, SAVED_MODEL_FILE))
    ]


def local_published_versions(model_root: str | os.PathLike[str]) -> list[int]:
    """published_versions() on the local file system; [] when the folder does not exist."""
    root = os.fspath(model_root)
    if not os.path.isdir(root):
        return []
    return published_versions(root, os.listdir, os.path.exists)


def version_path(model_root: str, version: int, *parts: str) -> str:
    return posixpath.join(str(model_root), str(version), *parts)


# -- metadata (assets.extra/fovea.json) ----------------------------------------------------------

METADATA_FORMAT = "fovea.export/1"


@dataclass
class ModelMetadata:
    """What assets.extra/fovea.json says about one published version."""

    name: str
    version: int
    labels: list[str]
    input_height: int
    input_width: int
    backbone: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    parent: str = ""  # the published version this one was trained from, if any
    # Temperature scaling folded into the signatures, and the abstention threshold fitted on val:
    # {"temperature", "target_precision", "threshold" (None: no threshold reaches the target), ...}
    calibration: dict[str, Any] = field(default_factory=dict)
    format: str = METADATA_FORMAT

    @property
    def score_threshold(self) -> float | None:
        """The top score at or above which this version's answers reached its target precision on val."""
        value = self.calibration.get("threshold")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def numeric_metrics(self) -> dict[str, float]:
        """The metrics that are plain numbers (what the server reports)."""
        return {
            k: float(v)
            for k, v in self.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    def to_json(self) -> str:
        """The file's text. Extra fields (preprocessing, signatures) are written for human readers."""
        doc: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "labels": list(self.labels),
            "num_classes": self.num_classes,
            "input_size": {"height": self.input_height, "width": self.input_width},
            "backbone": self.backbone,
            "preprocessing": {
                "input": "RGB uint8, 0..255",
                "resize": "bilinear to input_size, then round and clip to uint8",
                "in_graph": f"{self.backbone} preprocess_input",
            },
            "signatures": {
                "images": {
                    "name": SIGNATURE_IMAGES,
                    "input": INPUT_IMAGES,
                    "dtype": "uint8",
                    "output": OUTPUT,
                },
                "bytes": {"name": SIGNATURE_BYTES, "input": INPUT_BYTES, "dtype": "string", "output": OUTPUT},
            },
            "metrics": _jsonable(self.metrics),
            "config": _jsonable(self.config),
            "created_at": self.created_at,
        }
        if self.parent:
            doc["parent"] = self.parent
        if self.calibration:
            doc["calibration"] = _jsonable(self.calibration)
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, name: str = "", version: int = 0) -> ModelMetadata:
        """Parse the file; `name` and `version` (from the folder) win over what the file says.

        Raises ValueError with a readable reason for a file that is not fovea metadata.
        """
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{METADATA_FILE} is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{METADATA_FILE} must hold a JSON object")
        size = doc.get("input_size") or {}
        try:
            return cls(
                name=name or str(doc.get("name", "")),
                version=version or int(doc.get("version", 0)),
                labels=[str(label) for label in doc.get("labels") or []],
                input_height=int(size.get("height", 0)),
                input_width=int(size.get("width", 0)),
                backbone=str(doc.get("backbone", "")),
                metrics=dict(doc.get("metrics") or {}),
                config=dict(doc.get("config") or {}),
                created_at=str(doc.get("created_at", "")),
                parent=str(doc.get("parent", "")),
                calibration=dict(doc.get("calibration") or {}),
                format=str(doc.get("format", METADATA_FORMAT)),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{METADATA_FILE} has a malformed field: {exc}") from None

    def replace(self, **changes: Any) -> ModelMetadata:
        return dataclasses.replace(self, **changes)


def parse_labels(text: str) -> list[str]:
    """assets/labels.txt: one label per line, blank lines ignored."""
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def format_labels(labels: Iterable[str]) -> str:
    return "".join(f"{label}\n" for label in labels)


def _jsonable(value: Mapping[str, Any] | Any) -> Any:
    return json.loads(json.dumps(value, default=str))
