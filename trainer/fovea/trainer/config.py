"""The training configuration: one dataclass, every field documented, loadable from YAML or JSON.

Each field's `help` metadata is its `fovea train --help` text. Precedence: built-in defaults, then the
--config file, then flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fovea.contract import BACKBONES

# The value of an "auto" option: the trainer picks it from the other settings (see resolved()).
AUTO = None


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The random transformations applied to training images (never to validation, test or serving)."""

    flip: bool  # horizontal
    rotation: float  # up to +-degrees
    shift: float  # up to this fraction of height/width
    zoom: float  # up to this fraction
    brightness: float  # up to this fraction of 255
    contrast: float  # factor in [1-x, 1+x]

    @property
    def active(self) -> bool:
        return self.flip or any(
            v > 0 for v in (self.rotation, self.shift, self.zoom, self.brightness, self.contrast)
        )


# photo: the seed tutorial's ImageDataGenerator recipe, for photos of things whose label survives a
# mirror image and a tilt. upright: for orientation-sensitive images (text, symbols, documents, some
# medical images): no flip, no rotation, gentler shifts and zoom. none: the images as they are.
AUGMENT_PRESETS: dict[str, Augmentation] = {
    "photo": Augmentation(flip=True, rotation=30.0, shift=0.2, zoom=0.2, brightness=0.2, contrast=0.2),
    "upright": Augmentation(flip=False, rotation=0.0, shift=0.1, zoom=0.1, brightness=0.2, contrast=0.2),
    "none": Augmentation(flip=False, rotation=0.0, shift=0.0, zoom=0.0, brightness=0.0, contrast=0.0),
}
_AUGMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Augmentation))


def _field(default: Any, help: str, **extra: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class TrainConfig:
    """Everything `fovea train` needs; the resolved values are saved with the published model.

    None means "auto": resolved() fills it in from the other settings.
    """

    data: str = _field("", "folder of images: DATA/<label>/* or DATA/{train,val,test}/<label>/*")
    models: str = _field("", "model repository: the version is published to MODELS/<name>/<version>/")
    name: str = _field("classifier", "model name: the folder under --models")
    backbone: str = _field("resnet50", "backbone from tf_keras.applications", choices=BACKBONES)
    weights: str = _field(
        "imagenet",
        "base weights: 'imagenet' (downloaded or from ~/.keras/models), 'none' (random: trains from "
        "scratch), a local .h5 file of the base without its top, or a published version "
        "MODELS/NAME/VERSION (same classes: continue training it; other classes: its base, a new head)",
    )
    input_size: int = _field(224, "images are resized to PX x PX")
    epochs: int | None = _field(
        AUTO,
        "phase 1 (frozen base, new head): at most this many epochs; auto: 20 with pretrained "
        "weights, 3 with --weights none (random features only give the head a start)",
    )
    fine_tune_epochs: int | None = _field(
        AUTO,
        "phase 2 (top of the base unfrozen): at most this many epochs, 0 skips it; auto: 10 with "
        "pretrained weights, 20 with --weights none (the whole base learns here)",
    )
    fine_tune_layers: int | None = _field(
        AUTO,
        "phase 2 unfreezes this many layers at the top of the base (BatchNorm layers stay frozen); "
        "0 unfreezes all; auto: 30 with pretrained weights, all with --weights none",
    )
    learning_rate: float = _field(1e-3, "phase 1 Adam learning rate")
    fine_tune_learning_rate: float | None = _field(
        AUTO,
        "phase 2 Adam learning rate; auto: 1e-5 with pretrained weights, 3e-4 with --weights none "
        "(nothing pretrained to protect; 1e-3 was measured unstable, 1e-4 slow)",
    )
    batch_size: int | None = _field(
        AUTO,
        "images per step on each replica (the global batch is this x replicas); auto: 32 with "
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
    augment: str = _field(
        "photo",
        "augmentation preset: 'photo' (flips, rotation 30, shifts, zoom, brightness, contrast), 'upright' "
        "(no flip or rotation: text, symbols, documents), 'none'; the options below override one value",
        choices=tuple(AUGMENT_PRESETS),
    )
    flip: bool | None = _field(AUTO, "augmentation: random horizontal flip")
    rotation: float | None = _field(AUTO, "augmentation: random rotation up to +-DEGREES")
    shift: float | None = _field(AUTO, "augmentation: random translation up to this fraction of height/width")
    zoom: float | None = _field(AUTO, "augmentation: random zoom up to this fraction")
    brightness: float | None = _field(
        AUTO, "augmentation: random brightness change up to this fraction of 255"
    )
    contrast: float | None = _field(AUTO, "augmentation: random contrast factor in [1-x, 1+x]")
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
        "default MODELS/<name>/.backup; removed after a successful export, and when a disk fills up "
        "if this run made it; its free space (and the models folder's) is checked before training",
    )
    mixed_precision: str = _field(
        "auto",
        "mixed_float16 compute: 'auto' (when a GPU is present), 'on', 'off'",
        choices=("auto", "on", "off"),
    )
    tensorboard: str = _field(
        "", "write TensorBoard logs (scalars, learning rate, sample images) to DIR/<name>/<run start time>/"
    )
    calibrate: bool = _field(
        True,
        "fit a temperature on the validation split (minimum NLL) and fold it into the exported signatures, "
        "so served scores are calibrated probabilities; --no-calibrate keeps the raw softmax",
    )
    target_precision: float = _field(
        0.99,
        "record the top-score threshold whose answers reach this precision on the validation split "
        "(a caller's use_model_threshold abstains below it)",
    )
    audit: bool | None = _field(
        AUTO,
        "data-quality audit in the report (likely label errors from cross-validated probabilities, "
        "near-duplicates, thin test classes); auto: on up to 20,000 images",
    )
    exclude: str = _field(
        "", "a CSV with a 'path' column (e.g. an edited report/suspects.csv): train without those images"
    )
    demo_data_if_empty: bool = _field(False, "when --data holds no images, generate demo data into it first")
    gate: bool | None = _field(
        AUTO,
        "publish gate: compare with the newest published version of the same classes on this run's test "
        "split and publish only if not worse ('auto': on once such a version exists; --no-gate skips it)",
    )
    gate_against: int | None = _field(
        AUTO, "publish gate: the reference version (default: the newest with these classes)"
    )
    gate_tolerance: float = _field(0.01, "publish gate: the largest test-accuracy drop still published")
    gate_class_tolerance: float = _field(
        0.05, "publish gate: the largest drop of any one class's test recall still published"
    )
    verbose: int = _field(
        1,
        "Keras output: 1 progress bar per epoch (one line per epoch when not a terminal), 2 one line per epoch, 0 silent",
    )

    def resolved(self) -> TrainConfig:
        """A copy with the 'auto' values that depend only on the config filled in."""
        pretrained = self.weights.lower() != "none"
        out = dataclasses.replace(self)
        if out.fine_tune_layers is None:
            out.fine_tune_layers = 30 if pretrained else 0
        if out.fine_tune_learning_rate is None:
            out.fine_tune_learning_rate = 1e-5 if pretrained else 3e-4
        if out.batch_size is None:
            out.batch_size = 32 if pretrained else 16
        if out.epochs is None:
            out.epochs = 20 if pretrained else 3
        if out.fine_tune_epochs is None:
            out.fine_tune_epochs = 10 if pretrained else 20
        preset = AUGMENT_PRESETS[out.augment]
        for name in _AUGMENT_FIELDS:
            if getattr(out, name) is None:
                setattr(out, name, getattr(preset, name))
        if not out.backup_dir:
            out.backup_dir = str(Path(out.models) / out.name / ".backup")
        return out

    def augmentation(self) -> Augmentation:
        """The preset with any value given on its own applied over it."""
        preset = AUGMENT_PRESETS[self.augment]
        return Augmentation(
            **{
                name: getattr(preset, name) if getattr(self, name) is None else getattr(self, name)
                for name in _AUGMENT_FIELDS
            }
        )

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
        if self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"--augment must be one of {', '.join(AUGMENT_PRESETS)}, got {self.augment!r}")
        if self.input_size < 32:
            raise ValueError(f"--input-size must be at least 32, got {self.input_size}")
        if (self.epochs is not None and self.epochs < 1) or (
            self.fine_tune_epochs is not None and self.fine_tune_epochs < 0
        ):
            raise ValueError("--epochs must be >= 1 and --fine-tune-epochs >= 0 (or auto)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1 (or auto)")
        if self.fine_tune_layers is not None and self.fine_tune_layers < 0:
            raise ValueError("--fine-tune-layers must be >= 0 (0 unfreezes all) or auto")
        if self.fine_tune_learning_rate is not None and self.fine_tune_learning_rate <= 0:
            raise ValueError("--fine-tune-learning-rate must be > 0 (or auto)")
        if not (0 < self.val_split < 1 and 0 < self.test_split < 1 and self.val_split + self.test_split < 1):
            raise ValueError("--val-split and --test-split must be in (0, 1) and sum to less than 1")
        if self.cache not in ("auto", "memory", "none"):
            raise ValueError(f"--cache must be auto, memory or none, got {self.cache!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError("--dropout must be in [0, 1)")
        if not 0 < self.target_precision <= 1:
            raise ValueError(f"--target-precision must be in (0, 1], got {self.target_precision}")

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


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_value(name: str, value: Any) -> Any:
    """One option's value, from a flag (a string) or a file (YAML/JSON types), as its field's type.

    Strict, like the server's settings: "flase" is an error, not False; "auto" (or null) is None for
    the options that have an automatic value.
    """
    kind = FIELDS[name].type  # a string: annotations are postponed
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() == "auto")):
        return None
    if name == "augment" and isinstance(value, bool):
        return "photo" if value else "none"  # the files of the boolean --augment of earlier releases
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"not a boolean: {value!r} (use true or false)")
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise ValueError(f"not a {base}: {value!r}")
    if base == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        return int(value)
    if base == "float":
        return float(value)
    return str(value)


def make_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults < file < flags; values are converted to each field's type."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    kwargs = {}
    for name, value in merged.items():
        if value is None and not FIELDS[name].type.endswith("| None"):
            continue  # a file's `key:` with no value: the default
        try:
            kwargs[name] = parse_value(name, value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"option {name.replace('_', '-')}: cannot read {value!r}: {exc}") from None
    cfg = TrainConfig(**kwargs)
    cfg.validate()
    return cfg
