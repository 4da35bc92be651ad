"""`fovea serve`: flags and FOVEA_* variables -> Settings -> a running server."""

from __future__ import annotations

import argparse
import asyncio

from fovea.cli import CLIError
from fovea.server import config, logs


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve every model under --model-dir (<name>/<version>/ SavedModels published by `fovea train`) "
        "over gRPC (fovea.v1.ClassifierService, grpc.health.v1, reflection) with dynamic batching, "
        "hot reload and Prometheus metrics. Each flag can also be set with the environment variable "
        "shown in brackets. SIGTERM/SIGINT drain and exit 0."
    )
    config.add_arguments(parser)


def check_arguments(command: str, args: argparse.Namespace) -> None:
    """Every flag and FOVEA_* variable, checked before the dispatcher imports TensorFlow."""
    _settings(args)


def _settings(args: argparse.Namespace) -> config.Settings:
    try:
        settings = config.from_args(args)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if not settings.model_dir:
        raise CLIError("--model-dir (or FOVEA_MODEL_DIR) is required: the folder `fovea train` publishes to")
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca):
        if path:
            try:
                open(path, "rb").close()
            except OSError as exc:
                raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    return settings


def run(command: str, args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.setup(settings.log_format, settings.log_level)
    from fovea.server.app import StartupError, serve  # TensorFlow loads here, after the flags are checked

    try:
        return asyncio.run(serve(settings))
    except StartupError as exc:
        raise CLIError(str(exc)) from None
