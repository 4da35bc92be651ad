"""`fovea train` and `fovea demo-data`.

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
    "weights": "imagenet|none|PATH.h5",
    "name": "NAME",
    "cache": "auto|memory|none",
    "learning_rate": "LR",
    "fine_tune_learning_rate": "LR",
}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    if command == "demo-data":
        parser.add_argument("dir", metavar="DIR", help="folder to write DIR/<label>/*.png into")
        parser.add_argument("--classes", type=int, default=4, help="number of classes (2..6)")
        parser.add_argument("--per-class", type=int, default=100, help="images per class")
        parser.add_argument("--size", type=int, default=64, metavar="PX", help="image width and height")
        parser.add_argument("--seed", type=int, default=0, help="random seed")
        return
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of options (names as below, - or _); flags win"
    )
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = field.metadata["help"] + (" (required)" if field.name in ("data", "models") else "")
        if isinstance(default, bool):
            # Both spellings, so a file's `true` can be overridden from the command line either way.
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                help=f"{help_text} (default: {default})",
            )  # fmt: skip
            continue
        parser.add_argument(
            flag, dest=field.name, type=type(default), default=None, choices=field.metadata.get("choices"),
            metavar=None if field.metadata.get("choices") else _metavar(field.name, default),
            help=f"{help_text} (default: {default!r})" if default != "" else help_text,
        )  # fmt: skip
    # ArgumentDefaultsHelpFormatter would print "None" for our unset-sentinel defaults.
    parser.formatter_class = argparse.HelpFormatter


def _metavar(name: str, default: object) -> str:
    if name in _METAVARS:
        return _METAVARS[name]
    return {int: "N", float: "X"}.get(type(default), name.upper())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < flags."""
    try:
        file_values = load_file(args.config) if getattr(args, "config", None) else {}
        flags = {name: getattr(args, name, None) for name in FIELDS}
        return make_config(file_values, flags)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def run(command: str, args: argparse.Namespace) -> int:
    if command == "demo-data":
        return _run_demo_data(args)
    cfg = config_from_args(args)

    from fovea.trainer.backbones import WeightsError
    from fovea.trainer.data import DataError
    from fovea.trainer.train import run as train

    try:
        result = train(cfg, log=lambda msg: print(msg, flush=True))
    except (DataError, WeightsError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    m = result.metrics
    if result.version_path:
        test = m["test"]
        print(
            "\n"
            f"Published {result.version_path}\n"
            f"  test accuracy {m['test_accuracy']:.4f} (macro F1 {test['macro_f1']:.4f}) on {test['support']} images, "
            f"{len(result.dataset.labels)} classes\n"
            f"  epochs: phase 1 {m['phase1_epochs']}, phase 2 {m['phase2_epochs']}; best epoch {m['best_epoch'] or '-'}\n"
            f"  skipped files: {len(m['skipped_files'])}; took {m['total_seconds']:.0f} s\n"
            f"  report: {result.version_path}/report/",
            flush=True,
        )
    else:
        print(
            f"worker finished (test accuracy {m['test_accuracy']:.4f}); the chief publishes the model",
            flush=True,
        )
    return 0


def _run_demo_data(args: argparse.Namespace) -> int:
    from fovea.trainer.demo_data import generate

    try:
        counts = generate(
            args.dir, classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed
        )
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from None
    print(f"wrote {sum(counts.values())} images of {len(counts)} classes ({', '.join(counts)}) to {args.dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: fovea train | fovea demo-data")
