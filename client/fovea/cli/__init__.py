"""The `fovea` command line: one dispatcher, each subcommand importing only what it needs.

`fovea predict` must start without TensorFlow, so the subcommand table names modules, and a module
is imported only when its subcommand runs (or its --help is asked for).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

# name -> (module that defines `add_arguments(parser)` and `run(args) -> int`, one-line help). A module
# may also define `check_arguments(command, args)`, raising CLIError, which runs before TensorFlow is
# imported: a bad flag of `fovea train` or `fovea serve` is then reported in well under a second.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("fovea.client.client_commands", "classify images with a running server"),
    "health": ("fovea.client.client_commands", "ask a server whether it is serving"),
    "metadata": ("fovea.client.client_commands", "show a served model's labels, input size and metrics"),
    "models": ("fovea.client.client_commands", "list the models a server has loaded"),
    "rollout": (
        "fovea.client.rollout_command",
        "show or change a model's version labels, traffic shares and shadow (rollout.json)",
    ),
    "perf-data": ("fovea.client.perf_data", "write perf_analyzer's --input-data JSON from image files"),
    "train": (
        "fovea.trainer.train_command",
        "fine-tune a backbone on a folder of images and publish a SavedModel",
    ),
    "demo-data": (
        "fovea.trainer.demo_data_command",
        "generate a small labelled image set for demos and tests",
    ),
    "serve": (
        "fovea.server.serve_command",
        "serve published models: fovea.v1, KServe v2 (gRPC and REST), TF Serving",
    ),
    "demo": ("fovea.devtools.demo_command", "generate data, train, serve and classify, end to end"),
}


# Subcommands that load TensorFlow, whose start-up lines (oneDNN, "E0000 ... failed call to cuInit" on a
# CPU machine) are hidden unless --tf-logs (or FOVEA_TF_LOGS=1, which `fovea demo` passes to its children).
TF_COMMANDS = ("train", "demo-data", "serve", "demo")
TF_LOGS_ENV = "FOVEA_TF_LOGS"


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
    if command in TF_COMMANDS:
        parser.add_argument(
            "--tf-logs",
            action="store_true",
            help=f"keep TensorFlow's start-up log lines (oneDNN, CUDA probing); also {TF_LOGS_ENV}=1",
        )
    return parser


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[None]:
    """Send file descriptor 2 (where TensorFlow's C++ logs go) to a file; replay it on an error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _quiet_tensorflow_start() -> None:
    """Import TensorFlow and probe for GPUs with its start-up lines hidden: they print once per process.

    TF_CPP_MIN_LOG_LEVEL does not reach them (they are logged before absl is set up), hence the
    captured file descriptor. Later TensorFlow messages print as usual.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    try:
        with _native_stderr_captured():
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
    except ImportError:
        pass  # the subcommand reports the missing extra itself


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
        args = build_parser(command).parse_args(rest)
        args.command = command
        check = getattr(module, "check_arguments", None)
        if check is not None:
            check(command, args)
        if command in TF_COMMANDS:
            if args.tf_logs:
                os.environ[TF_LOGS_ENV] = "1"  # and to the subprocesses of `fovea demo`
            elif os.environ.get(TF_LOGS_ENV) != "1" and command != "demo":
                _quiet_tensorflow_start()
        return int(module.run(command, args) or 0)
    except CLIError as exc:
        print(f"fovea {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fovea {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
