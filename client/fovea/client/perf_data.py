"""`fovea perf-data`: write perf_analyzer's --input-data JSON from image files, for MODEL-encoded.

perf_analyzer fills every input a model declares; for `MODEL-encoded` (BYTES `image_bytes [-1, 1]`)
random bytes are not images, so it needs real ones. Its JSON takes a BYTES tensor as base64 of the
raw form: each element a 4-byte little-endian length, then the bytes. Imports no TensorFlow.

    fovea perf-data images/ -o data.json
    perf_analyzer -m MODEL-encoded --input-data data.json -u HOST:8500 -i grpc
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fovea.cli import CLIError
from fovea.client import FoveaError
from fovea.client._inputs import encode_inputs
from fovea.contract import INPUT_BYTES


def input_data(images: Sequence[str | Path], input_name: str = INPUT_BYTES) -> dict[str, Any]:
    """perf_analyzer's input-data document: one entry per image, each a batch-1 BYTES tensor [1]."""
    entries = []
    for item in encode_inputs(list(images)):
        data = item.image.encoded
        raw = struct.pack("<I", len(data)) + data
        entries.append({input_name: {"b64": base64.b64encode(raw).decode("ascii"), "shape": [1]}})
    return {"data": entries}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files (JPEG, PNG, GIF, BMP) or folders of them",
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="the JSON file to write ('-': stdout)"
    )
    parser.add_argument(
        "--input-name",
        default=INPUT_BYTES,
        metavar="NAME",
        help="the BYTES input's name (default: %(default)s)",
    )


def run(command: str, args: argparse.Namespace) -> int:
    try:
        document = input_data(args.images, args.input_name)
    except FoveaError as exc:
        raise CLIError(exc.details) from None
    text = json.dumps(document)
    if args.output == "-":
        sys.stdout.write(text + "\n")
        return 0
    try:
        Path(args.output).write_text(text)
    except OSError as exc:
        raise CLIError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(
        f"wrote {len(document['data'])} images to {args.output}; use it with "
        f"perf_analyzer -m MODEL-encoded --input-data {args.output}",
        file=sys.stderr,
    )
    return 0
