"""`fovea train`.

Every TrainConfig field is a flag of `fovea train`; --config FILE (YAML or JSON) supplies any of them,
and flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from fovea.cli import CLIError
from fovea.trainer.config import FIELDS, TrainConfig, load_file, make_config

_METAVARS = {
    "data": "DIR",
    "models": "MODELS_DIR",
    "backup_dir": "DIR",
    "input_size": "PX",
    "weights": "imagenet|none|PATH.h5|MODELS/NAME/VERSION",
    "tensorboard": "DIR",
    "name": "NAME",
    "cache": "auto|memory|none",
    "learning_rate": "LR",
    "fine_tune_learning_rate": "LR",
}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of options (names as below, - or _); flags win"
    )
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = field.metadata["help"] + (" (required)" if field.name in ("data", "models") else "")
        if field.type.startswith("bool"):
            # Both spellings, so a file's `true` can be overridden from the command line either way.
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                help=f"{help_text} (default: {'auto' if default is None else default})",
            )  # fmt: skip
            continue
        # Values are read as strings and converted (strictly) by config.make_config, like a file's.
        choices = field.metadata.get("choices")
        parser.add_argument(
            flag, dest=field.name, type=str, default=None, choices=choices,
            metavar=None if choices else _metavar(field),
            help=help_text if default == "" else f"{help_text} (default: {'auto' if default is None else repr(default)})",
        )  # fmt: skip
    # ArgumentDefaultsHelpFormatter would print "None" for our unset-sentinel defaults.
    parser.formatter_class = argparse.HelpFormatter


def _metavar(field: dataclasses.Field) -> str:
    if field.name in _METAVARS:
        return _METAVARS[field.name]
    base = field.type.removesuffix(" | None")
    name = {"int": "N", "float": "X"}.get(base, field.name.upper())
    return f"{name}|auto" if field.type.endswith("| None") else name


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < flags."""
    try:
        file_values = load_file(args.config) if getattr(args, "config", None) else {}
        flags = {name: getattr(args, name, None) for name in FIELDS}
        return make_config(file_values, flags)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def check_arguments(command: str, args: argparse.Namespace) -> None:
    """Every flag and the --config file, checked before the dispatcher imports TensorFlow."""
    config_from_args(args)


def run(command: str, args: argparse.Namespace) -> int:
    cfg = config_from_args(args)

    from fovea.trainer.backbones import WeightsError
    from fovea.trainer.data import DataError
    from fovea.trainer.disk_space import DiskFullError
    from fovea.trainer.model_lock import ModelBusyError
    from fovea.trainer.train import run as train

    try:
        result = train(cfg, log=lambda msg: print(msg, flush=True))
    except (DataError, WeightsError, ModelBusyError, DiskFullError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    m = result.metrics
    if result.version_path:
        best = "-" if m.best_epoch is None else m.best_epoch
        print(
            "\n"
            f"Published {result.version_path}\n"
            f"  test accuracy {m.test_accuracy:.4f} (macro F1 {m.test.macro_f1:.4f}) on {m.test.support} images, "
            f"{len(result.dataset.labels)} classes\n"
            f"  epochs: phase 1 {m.phase1_epochs}, phase 2 {m.phase2_epochs}; best epoch {best}\n"
            f"  {m.backbone} at {m.input_size}x{m.input_size} px, base weights: {m.weights}\n"
            f"  skipped files: {len(m.skipped_files)}; training took {m.train_seconds:.0f} s\n"
            f"  report: {result.report_index}",
            flush=True,
        )
        for i, warning in enumerate(m.warnings):
            print(("\nWARNING: " if i == 0 else "  ") + warning, flush=True)
    else:
        print(
            f"worker finished (test accuracy {m.test_accuracy:.4f}); the chief publishes the model",
            flush=True,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: fovea train")
