"""`fovea predict`, `fovea health`, `fovea metadata` and `fovea models`: the client's command line.

Loaded by the dispatcher in fovea.cli; imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fovea.cli import CLIError
from fovea.client import Client, FoveaError, ModelMetadata, ModelStatus, Prediction, RetryPolicy
from fovea.client._inputs import EncodedInput, image_files, read_file

DEFAULT_TARGET = "localhost:8500"
CLI_DEFAULT_TIMEOUT = 10.0
# `fovea predict` on a folder: the default deadline grows with the work, by CLI_DEFAULT_TIMEOUT for
# every this many images (a batch's worth). A fixed 10 s failed 300 small images on a busy 2-core
# CPU server that answered them all in 30 s; a caller who wants a bound passes --timeout.
IMAGES_PER_DEFAULT_TIMEOUT = 32


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("FOVEA_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help="the server address or a gRPC name such as dns:///svc:8500 "
        "(default: $FOVEA_TARGET, else %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"the deadline of the whole command in seconds, retries included (default: "
        f"{CLI_DEFAULT_TIMEOUT:g}; for predict {CLI_DEFAULT_TIMEOUT:g} per {IMAGES_PER_DEFAULT_TIMEOUT} images)",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    tls.add_argument("--ca-cert", metavar="PEM", help="root certificates to trust (implies --tls)")
    tls.add_argument("--client-cert", metavar="PEM", help="client certificate chain (needs --client-key)")
    tls.add_argument("--client-key", metavar="PEM", help="client private key (needs --client-cert)")
    if command in ("predict", "metadata"):
        parser.add_argument("--model", metavar="NAME", help="the model name (default: the only one served)")
        parser.add_argument(
            "--version", type=int, default=0, metavar="N", help="the model version (default: latest)"
        )
    if command in ("predict", "metadata", "models"):
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    if command == "predict":
        parser.add_argument(
            "--top-k",
            type=int,
            default=None,
            metavar="K",
            help="labels per image (default: the server's, 5 or every class when there are fewer)",
        )
        parser.add_argument(
            "--probabilities", action="store_true", help="include every class probability (with --json)"
        )
        parser.add_argument(
            "--min-score",
            type=float,
            default=None,
            metavar="X",
            help="answer only when the top score is at least X (0..1); below it the row says 'unsure'",
        )
        parser.add_argument(
            "--use-model-threshold",
            action="store_true",
            help="use the threshold the model recorded for its target precision instead of --min-score",
        )
        parser.add_argument(
            "images",
            nargs="+",
            metavar="IMAGE_OR_DIR",
            help="image files (JPEG, PNG, GIF, BMP) or folders of them",
        )
    if command == "health":
        parser.add_argument(
            "--service", default="", help="the service to ask about (default: the whole server)"
        )


def run(command: str, args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.timeout > 0:
        raise CLIError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    try:
        with _client(args) as client:
            if command == "predict":
                return _predict(client, args)
            if command == "health":
                return _health(client, args)
            if command == "metadata":
                return _metadata(client, args)
            if command == "models":
                return _models(client, args)
    except FoveaError as err:
        raise CLIError(_one_line(args.target, err)) from None
    raise CLIError(f"unknown command {command!r}")


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.target,
        default_timeout=args.timeout or CLI_DEFAULT_TIMEOUT,
        tls=args.tls,
        root_certificates=args.ca_cert,
        certificate_chain=args.client_cert,
        private_key=args.client_key,
        # A wrong --target or a dead server: one line at once, not retries until the deadline.
        # A server without any model: say so at once too; waiting for the deadline would not help.
        retry_policy=RetryPolicy(fail_fast_unreachable=True, fail_fast_no_model=True),
    )


def _one_line(target: str, err: FoveaError) -> str:
    details = " ".join(err.details.split())
    if err.code.name == "INVALID_ARGUMENT":
        return details  # about the input; the server is beside the point
    if err.code.name == "UNAVAILABLE" and details.startswith("cannot connect: "):
        return f"cannot connect to {target}: {details.removeprefix('cannot connect: ')}"
    return f"{target}: {err.code.name}: {details}"


# -- predict -------------------------------------------------------------------------------------


def _predict(client: Client, args: argparse.Namespace) -> int:
    """Classify every file that can be; name each one that cannot on stderr, and exit 1 if any."""
    inputs, bad = read_images(args.images)
    if args.timeout is None:
        args.timeout = CLI_DEFAULT_TIMEOUT * max(1, math.ceil(len(inputs) / IMAGES_PER_DEFAULT_TIMEOUT))
    deadline = time.monotonic() + args.timeout
    predictions: list[Prediction] = []
    if inputs:
        predictions, rejected = _predict_inputs(client, inputs, args, deadline)
        bad += rejected
    if predictions:
        if args.json:
            print(json.dumps([p.to_dict() for p in predictions], indent=2))
        else:
            print(format_predictions(predictions))
    for line in bad:
        print(f"fovea predict: error: {line}", file=sys.stderr)
    if bad:
        total = len(predictions) + len(bad)
        if total > 1:
            print(f"fovea predict: {len(bad)} of {total} images could not be classified", file=sys.stderr)
        return 1
    return 0


def read_images(paths: Sequence[str]) -> tuple[list[EncodedInput], list[str]]:
    """Each file read and checked on its own (folders expanded): (the good ones, one line per bad one
    naming it). A bad file no longer hides the answers of the others."""
    good: list[EncodedInput] = []
    bad: list[str] = []
    for path in paths:
        try:
            files = image_files(Path(path))
        except FoveaError as err:
            bad.append(err.details)
            continue
        for file in files:
            try:
                good.append(read_file(file))
            except FoveaError as err:
                bad.append(err.details)
    return good, bad


# The server names a bad image by its index in the request: images[2].encoded could not be decoded.
_IMAGE_INDEX = re.compile(r"^images\[\d+\](?:\.encoded)?")


def _predict_inputs(
    client: Client, inputs: list[EncodedInput], args: argparse.Namespace, deadline: float
) -> tuple[list[Prediction], list[str]]:
    """All inputs in one call; when the server rejects one image of it (INVALID_ARGUMENT naming
    images[i], e.g. a truncated file whose header looked right), each image again on its own, to
    answer the good ones and name the bad ones."""

    def predict(images: list[EncodedInput]) -> list[Prediction]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CLIError(f"{args.target}: DEADLINE_EXCEEDED: deadline of {args.timeout:g} s exceeded")
        return client.predict(
            images, top_k=args.top_k, model=args.model, version=args.version,
            return_probabilities=args.probabilities, min_score=args.min_score,
            use_model_threshold=args.use_model_threshold, timeout=remaining,
        )  # fmt: skip

    try:
        return predict(inputs), []
    except FoveaError as err:
        if not _names_an_image(err):
            raise
    predictions: list[Prediction] = []
    bad: list[str] = []
    for item in inputs:
        try:
            predictions += predict([item])
        except FoveaError as err:
            if not _names_an_image(err):
                raise
            bad.append(_IMAGE_INDEX.sub(item.source, " ".join(err.details.split()), count=1))
    return predictions, bad


def _names_an_image(err: FoveaError) -> bool:
    return err.code.name == "INVALID_ARGUMENT" and bool(_IMAGE_INDEX.match(err.details))


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """An aligned table: one row per image, its top labels with scores, then the model used."""
    k = max((len(p.top) for p in predictions), default=0)
    header = ["FILE", *(f"TOP {i + 1}" for i in range(k))]
    # An abstained row still shows its labels (a person may want them), after the word "unsure".
    rows = [
        [
            p.source,
            *(
                ("unsure " if p.abstained and i == 0 else "") + f"{c.label} {c.score:.3f}"
                for i, c in enumerate(p.top)
            ),
        ]
        for p in predictions
    ]
    lines = _table([header, *rows])
    models = sorted({(p.model_name, p.model_version) for p in predictions})
    lines.append(
        "model: " + ", ".join(f"{name or '(default)'} version {version}" for name, version in models)
    )
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    width = max(len(r) for r in rows)
    widths = [max((len(r[i]) for r in rows if i < len(r)), default=0) for i in range(width)]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


# -- health, metadata, models --------------------------------------------------------------------


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(service=args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _metadata(client: Client, args: argparse.Namespace) -> int:
    meta = client.metadata(model=args.model, version=args.version)
    print(json.dumps(meta.to_dict(), indent=2) if args.json else format_metadata(meta))
    return 0


def format_metadata(meta: ModelMetadata) -> str:
    fields = [
        ("model", meta.name),
        ("version", str(meta.version)),
        ("loaded versions", ", ".join(map(str, meta.loaded_versions))),
        ("backbone", meta.backbone),
        ("input size", f"{meta.input_height}x{meta.input_width} (height x width)"),
        ("classes", f"{len(meta.labels)}: {', '.join(meta.labels)}"),
        ("created at", meta.created_at),
        ("max images/request", str(meta.max_images_per_request or "not reported")),
        *((f"metric {k}", f"{v:.4g}") for k, v in meta.metrics.items()),
    ]
    width = max(len(k) for k, _ in fields)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in fields)


def _models(client: Client, args: argparse.Namespace) -> int:
    models = client.list_models()
    print(json.dumps([m.to_dict() for m in models], indent=2) if args.json else format_models(models))
    return 0


def format_models(models: Sequence[ModelStatus]) -> str:
    if not models:
        return "no models"
    labelled = any(m.version_labels for m in models)  # the LABELS column only once a rollout exists
    rows = [["MODEL", "VERSIONS", "READY"] + (["LABELS"] if labelled else [])]
    for m in models:
        row = [m.name, ",".join(map(str, m.versions)) or "-", "yes" if m.ready else "no"]
        if labelled:
            row.append(",".join(f"{k}={v}" for k, v in sorted(m.version_labels.items())) or "-")
        rows.append(row)
    return "\n".join(_table(rows))


if __name__ == "__main__":  # pragma: no cover - the dispatcher is the entry point
    from fovea.cli import main

    sys.exit(main([sys.argv[1], *sys.argv[2:]]))
