"""Input codecs: turn what a caller has into fovea.v1 Image messages, each with a display name.

Files are sent exactly as read (the server decodes them); arrays and PIL images are sent as raw
little-endian row-major pixels. Nothing here decodes or resizes an image: that is the server's job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fovea.client._errors import invalid_argument
from fovea.contract import IMAGE_SUFFIXES
from fovea.v1 import classifier_pb2

# Magic numbers of the encodings the server decodes, so a wrong file fails here with its name.
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))

# (kind, itemsize) -> wire dtype; keyed this way so big-endian arrays are accepted too.
_DTYPES = {("u", 1): classifier_pb2.DATA_TYPE_UINT8, ("f", 4): classifier_pb2.DATA_TYPE_FLOAT32}


@dataclass(frozen=True)
class EncodedInput:
    """One image ready to send, and the name to show for it."""

    source: str
    image: classifier_pb2.Image


def _encoding_of(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    return None


def _encoded(data: bytes, source: str) -> EncodedInput:
    if not data:
        raise invalid_argument(f"{source}: empty image data")
    if _encoding_of(data) is None:
        raise invalid_argument(f"{source}: not a JPEG, PNG, GIF or BMP image")
    return EncodedInput(source, classifier_pb2.Image(encoded=data))


def _raw(array: np.ndarray, source: str) -> EncodedInput:
    if (array.dtype.kind, array.dtype.itemsize) not in _DTYPES:
        if array.dtype.kind == "f":
            # float64 (numpy's default) and float16 are widened/narrowed to the float32 the API takes.
            array = array.astype(np.float32)
        else:
            raise invalid_argument(
                f"{source}: dtype {array.dtype} is not supported; use uint8 (0..255) or float32 "
                "(0..255 scale), e.g. array.astype(numpy.uint8)"
            )
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        raise invalid_argument(
            f"{source}: shape {array.shape} is not [height, width, channels] with 1, 3 or 4 channels"
        )
    if array.size == 0:
        raise invalid_argument(f"{source}: empty array of shape {array.shape}")
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    dtype = _DTYPES[(array.dtype.kind, array.dtype.itemsize)]
    raw = classifier_pb2.RawImage(dtype=dtype, shape=list(array.shape), data=little.tobytes())
    return EncodedInput(source, classifier_pb2.Image(raw=raw))


def _from_array(array: np.ndarray, name: str) -> list[EncodedInput]:
    if array.ndim in (2, 3):
        return [_raw(array, name)]
    if array.ndim == 4:
        return [_raw(array[i], f"{name}[{i}]") for i in range(array.shape[0])]
    raise invalid_argument(
        f"{name}: an array must be [H, W], [H, W, C] or [N, H, W, C]; got shape {array.shape}"
    )


def _is_pil_image(obj: Any) -> bool:
    # Pillow is optional: if it was never imported, obj cannot be one of its images.
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(obj, pil.Image)


def _from_pil(image: Any, name: str) -> EncodedInput:
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    return _raw(np.asarray(image), name)


def image_files(path: Path) -> list[Path]:
    """The image files a path names: a folder's, sorted by name (hidden files and subfolders not
    searched), or the path itself. INVALID_ARGUMENT for a folder without any."""
    if not path.is_dir():
        return [path]
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise invalid_argument(
            f"{path}: the folder holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files "
            "(subfolders are not searched)"
        )
    return files


def _from_path(path: Path) -> list[EncodedInput]:
    return [read_file(p) for p in image_files(path)]


def read_file(path: Path) -> EncodedInput:
    """One image file, read and checked by its magic number; INVALID_ARGUMENT naming it otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise invalid_argument(f"{path}: no such file or folder") from None
    except OSError as exc:
        raise invalid_argument(f"{path}: cannot read: {exc.strerror or exc}") from None
    return _encoded(data, str(path))


def _one(item: Any, position: int | None) -> list[EncodedInput]:
    suffix = "" if position is None else f" {position}"
    if isinstance(item, EncodedInput):
        return [item]  # already read and checked (the CLI does so file by file)
    if isinstance(item, (str, os.PathLike)):
        return _from_path(Path(item))
    if isinstance(item, (bytes, bytearray, memoryview)):
        return [_encoded(bytes(item), f"<bytes{suffix}>")]
    if isinstance(item, np.ndarray):
        return _from_array(item, f"<array{suffix}>")
    if _is_pil_image(item):
        filename = getattr(item, "filename", "") or f"<PIL image{suffix}>"
        return [_from_pil(item, filename)]
    raise invalid_argument(
        f"input{suffix}: unsupported type {type(item).__name__}; pass file paths, folders, bytes, "
        "numpy arrays or PIL images"
    )


def encode_inputs(images: Any) -> list[EncodedInput]:
    """Expand one input or a list of inputs into EncodedInputs, in order."""
    if isinstance(
        images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, EncodedInput)
    ) or _is_pil_image(images):
        out = _one(images, None)
    elif isinstance(images, Iterable):
        out = [encoded for i, item in enumerate(images) for encoded in _one(item, i)]
    else:
        out = _one(images, None)
    if not out:
        raise invalid_argument("no images given")
    return out
