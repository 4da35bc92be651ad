"""Read an encoded image's format and dimensions from its header, without decoding it.

This is the decompression-bomb guard: a 50 KB PNG can claim 50,000 x 50,000 pixels, so the server
checks the claimed size against --max-pixels before any decoder allocates memory. Pure Python and
exact for the formats tf.io.decode_image reads (JPEG, PNG, GIF, BMP).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# JPEG start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8}


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    frames: int = 1

    @property
    def pixels(self) -> int:
        # TF decodes every GIF frame even when it keeps only the first, so all frames count.
        return self.width * self.height * self.frames


class UnreadableImage(ValueError):
    """The bytes are not a JPEG, PNG, GIF or BMP whose header could be read."""


def read_info(data: bytes) -> ImageInfo:
    """The format and claimed dimensions of an encoded image; UnreadableImage if not recognised."""
    try:
        if data[:2] == b"\xff\xd8":
            return _jpeg(data)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            width, height = struct.unpack(">II", data[16:24])
            return ImageInfo("png", width, height)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(data)
        if data[:2] == b"BM":
            return _bmp(data)
    except (struct.error, IndexError):
        raise UnreadableImage("the image header is truncated") from None
    raise UnreadableImage("not a JPEG, PNG, GIF or BMP image")


def _jpeg(data: bytes) -> ImageInfo:
    i = 2
    while i < len(data):
        if data[i] != 0xFF:
            raise UnreadableImage("corrupt JPEG header")
        while data[i] == 0xFF:  # fill bytes
            i += 1
        marker = data[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            return ImageInfo("jpeg", width, height)
        i += length
    raise UnreadableImage("JPEG without a frame header")


def _gif(data: bytes) -> ImageInfo:
    width, height, flags = struct.unpack("<HHB", data[6:11])
    i = 13
    if flags & 0x80:
        i += 3 * (2 ** ((flags & 7) + 1))
    frames = 0
    while i < len(data):
        block = data[i]
        if block == 0x2C:  # image descriptor
            frames += 1
            local = data[i + 9]
            i += 10
            if local & 0x80:
                i += 3 * (2 ** ((local & 7) + 1))
            i = _skip_sub_blocks(data, i + 1)  # +1: LZW minimum code size
        elif block == 0x21:  # extension
            i = _skip_sub_blocks(data, i + 2)
        else:  # 0x3B trailer, or garbage the decoder will judge
            break
    return ImageInfo("gif", width, height, max(frames, 1))


def _skip_sub_blocks(data: bytes, i: int) -> int:
    while i < len(data):
        size = data[i]
        i += 1
        if size == 0:
            break
        i += size
    return i


def _bmp(data: bytes) -> ImageInfo:
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit dimensions
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return ImageInfo("bmp", abs(width), abs(height))
