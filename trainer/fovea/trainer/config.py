"""The training configuration: one dataclass, every field documented, loadable from YAML or JSON.

Each field's `help` metadata is its `fovea train --help` text. Precedence: built-in defaults, then the
--config file, then flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

BACKBONES = ("resnet50", "vgg16", "vgg19")


def _field(default: Any, help: str, **extra: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class TrainConfig:
    """Everything `fovea train` needs; the resolved values are saved with the published model."""

    data: str = _field("", "folder of images: DATA/<label>/* or DATA/{train,val,test}/<label>/*")
    models: str = _field("", "model repository: the version is published to MODELS/<name>/<version>/")
    name: str = _field("classifier", "model name: the folder under --models")
    backbone: str = _field("resnet50", "backbone from tf_keras.applications", choices=BACKBONES)
    weights: str = _field(
        "imagenet",
        "base weights: 'imagenet' (downloaded or from ~/.keras/models), 'none' (random: trains from "
        "scratch), or a local .h5 file of the base without its top",
    )
    input_size: int = _field(224, "images are resized to PX x PX")
    epochs: int = _field(
        -1,
        "phase 1 (frozen base, new head): at most this many epochs; -1 (auto): 20 with pretrained "
        "weights, 3 with --weights none (random features only give the head a start)",
    )
    fine_tune_epochs: int = _field(
        -1,
        "phase 2 (top of the base unfrozen): at most this many epochs, 0 skips it; -1 (auto): 10 with "
        "pretrained weights, 20 with --weights none (the whole base learns here)",
    )
    fine_tune_layers: int = _field(
        -1,
        "phase 2 unfreezes this many layers at the top of the base (BatchNorm layers stay frozen); "
        "0 unfreezes all; -1 (auto): 30 with pretrained weights, all with --weights none",
    )
    learning_rate: float = _field(1e-3, "phase 1 Adam learning rate")
    fine_tune_learning_rate: float = _field(
        -1.0,
        "phase 2 Adam learning rate; -1 (auto): 1e-5 with pretrained weights, 3e-4 with --weights none "
        "(nothing pretrained to protect; 1e-3 was measured unstable, 1e-4 slow)",
    )
    batch_size: int = _field(
        -1,
        "images per step on each replica (the global batch is this x replicas); -1 (auto): 32 with "
        "pretrained weights, 16 with --weights none (more steps per epoch measured to learn faster)",
    )
    patience: int = _field(3, "early stopping: epochs without a better val_loss before a phase stops")
    reduce_lr_patience: int = _field(
        2, "ReduceLROnPlateau: epochs without a better val_loss before the LR drops"
    )
    reduce_lr_factor: float = _field(0.2, "ReduceLROnPlateau: the LR is multiplied by this")
    dropout: float = _field(0.2, "dropout rate before the dense head")
    head_norm: str = _field(
        "none",
        "normalise the pooled features before the dense head: 'none', 'layer' (LayerNormalization) or "
        "'batch' (BatchNormalization); with --weights none 'batch' learned faster but validated erratically",
        choices=("none", "layer", "batch"),
    )
    l2: float = _field(0.0, "L2 regularisation factor on the head's kernel (0 = off)")
    label_smoothing: float = _field(0.0, "label smoothing of the cross-entropy loss (0 = off)")
    augment: bool = _field(True, "random augmentation during training (the settings below)")
    flip: bool = _field(True, "augmentation: random horizontal flip")
    rotation: float = _field(30.0, "augmentation: random rotation up to +-DEGREES")
    shift: float = _field(0.2, "augmentation: random translation up to this fraction of height/width")
    zoom: float = _field(0.2, "augmentation: random zoom up to this fraction")
    brightness: float = _field(0.2, "augmentation: random brightness change up to this fraction of 255")
    contrast: float = _field(0.2, "augmentation: random contrast factor in [1-x, 1+x]")
    val_split: float = _field(0.1, "fraction of each class held out for validation (DATA/<label> layout)")
    test_split: float = _field(0.1, "fraction of each class held out for the test (DATA/<label> layout)")
    class_weights: bool = _field(True, "weight the loss by inverse class frequency (for imbalanced data)")
    cache: str = _field(
        "auto", "cache decoded images: 'auto' (in memory when they fit in --cache-limit-mb), 'memory', 'none'"
    )
    cache_limit_mb: int = _field(2048, "memory the 'auto' cache may use")
    steps_per_epoch: int = _field(0, "limit each epoch to this many steps (0 = the whole training split)")
    seed: int = _field(0, "seed of the split, the shuffling, the augmentation and the head's initialisation")
    backup_dir: str = _field(
        "",
        "checkpoints for resuming a killed run (the same command continues at the next epoch); "
        "default MODELS/<name>/.backup; removed after a successful export",
    )
    mixed_precision: str = _field(
        "auto",
        "mixed_float16 compute: 'auto' (when a GPU is present), 'on', 'off'",
        choices=("auto", "on", "off"),
    )
    demo_data_if_empty: bool = _field(False, "when --data holds no images, generate demo data into it first")
    verbose: int = _field(
        1,
        "Keras output: 1 progress bar per epoch (one line per epoch when not a terminal), 2 one line per epoch, 0 silent",
    )

    def resolved(self) -> TrainConfig:
        """A copy with the 'auto' values that depend only on the config filled in."""
        pretrained = self.weights.lower() != "none"
        out = dataclasses.replace(self)
        if out.fine_tune_layers < 0:
            out.fine_tune_layers = 30 if pretrained else 0
        if out.fine_tune_learning_rate < 0:
            out.fine_tune_learning_rate = 1e-5 if pretrained else 3e-4
        if out.batch_size < 0:
            out.batch_size = 32 if pretrained else 16
        if out.epochs < 0:
            out.epochs = 20 if pretrained else 3
        if out.fine_tune_epochs < 0:
            out.fine_tune_epochs = 10 if pretrained else 20
        if not out.backup_dir:
            out.backup_dir = str(Path(out.models) / out.name / ".backup")
        return out

    def validate(self) -> None:
        """Raise ValueError with an actionable message for a value that cannot work."""
        if not self.data:
            raise ValueError("--data is required: the folder of labelled images")
        if not self.models:
            raise ValueError("--models is required: the folder to publish the model version into")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"--name {self.name!r} must be a plain folder name")
        if self.backbone not in BACKBONES:
            raise ValueError(f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.input_size < 32:
            raise ValueError(f"--input-size must be at least 32, got {self.input_size}")
        if self.epochs == 0 or self.epochs < -1 or self.fine_tune_epochs < -1:
            raise ValueError("--epochs must be >= 1 and --fine-tune-epochs >= 0 (or -1 for the default)")
        if self.batch_size == 0 or self.batch_size < -1:
            raise ValueError("--batch-size must be >= 1 (or -1 for the default)")
        if not (0 < self.val_split < 1 and 0 < self.test_split < 1 and self.val_split + self.test_split < 1):
            raise ValueError("--val-split and --test-split must be in (0, 1) and sum to less than 1")
        if self.cache not in ("auto", "memory", "none"):
            raise ValueError(f"--cache must be auto, memory or none, got {self.cache!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError("--dropout must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of TrainConfig fields (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {path}")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        raw = json.loads(text)
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from None
        raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"{path}: unknown option {key!r}; see fovea train --help")
        out[name] = value
    return out


def make_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults < file < flags; values are converted to each field's type."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    kwargs = {}
    for name, value in merged.items():
        kind = type(FIELDS[name].default)
        try:
            if kind is bool and isinstance(value, str):
                value = value.strip().lower() in ("1", "true", "yes", "on")
            kwargs[name] = kind(value) if value is not None else FIELDS[name].default
        except (TypeError, ValueError):
            raise ValueError(
                f"option {name.replace('_', '-')}: cannot read {value!r} as {kind.__name__}"
            ) from None
    cfg = TrainConfig(**kwargs)
    cfg.validate()
    return cfg
