"""`fovea demo-data`: write the demo image set (fovea.trainer.demo_data) to a folder."""

from __future__ import annotations

import argparse
import sys

from fovea.cli import CLIError


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("dir", metavar="DIR", help="folder to write DIR/<label>/*.png into")
    parser.add_argument("--classes", type=int, default=4, help="number of classes (2..6)")
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--size", type=int, default=64, metavar="PX", help="image width and height")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(command: str, args: argparse.Namespace) -> int:
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
    sys.exit("run it as: fovea demo-data")
