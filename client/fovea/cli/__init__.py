"""The `fovea` command line: one dispatcher, each subcommand importing only what it needs.

`fovea predict` must start without TensorFlow, so the subcommand table names modules, and a module
is imported only when its subcommand runs (or its --help is asked for).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module that defines `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("fovea.client.client_commands", "classify images with a running server"),
    "health": ("fovea.client.client_commands", "ask a server whether it is serving"),
    "metadata": ("fovea.client.client_commands", "show a served model's labels, input size and metrics"),
    "models": ("fovea.client.client_commands", "list the models a server has loaded"),
    "perf-data": ("fovea.client.perf_data", "write perf_analyzer's --input-data JSON from image files"),
    "train": ("fovea.trainer.cli", "fine-tune a backbone on a folder of images and publish a SavedModel"),
    "demo-data": ("fovea.trainer.cli", "generate a small labelled image set for demos and tests"),
    "serve": (
        "fovea.server.serve_command",
        "serve published models: fovea.v1, KServe v2 (gRPC and REST), TF Serving",
    ),
    "demo": ("fovea.devtools.demo_command", "generate data, train, serve and classify, end to end"),
}


class CLIError(Exception):
    """A failure the CLI reports as one line and a non-zero exit, never a traceback."""


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fovea",
        description="Turn a folder of labelled images into a production image-classification service.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def build_parser(command: str) -> argparse.ArgumentParser:
    """The full parser of one subcommand, importing its module (tests use this on k8s args)."""
    module_name, help_text = SUBCOMMANDS[command]
    module = _import_subcommand(module_name)
    parser = argparse.ArgumentParser(prog=f"fovea {command}", description=help_text)
    module.add_arguments(command, parser)
    return parser


def _import_subcommand(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        # fovea.server / fovea.trainer / fovea.devtools raise a one-line hint that names the extras to install.
        raise CLIError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        _top_parser().parse_args(argv)  # prints usage or the list of commands, then exits
        return 2
    command, rest = argv[0], argv[1:]
    try:
        module = _import_subcommand(SUBCOMMANDS[command][0])
        parser = argparse.ArgumentParser(prog=f"fovea {command}", description=SUBCOMMANDS[command][1])
        module.add_arguments(command, parser)
        args = parser.parse_args(rest)
        args.command = command
        return int(module.run(command, args) or 0)
    except CLIError as exc:
        print(f"fovea {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fovea {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
