"""Read an encoded image's format and the memory its decoder will allocate, without decoding it.

This is the decompression-bomb guard: a 50 KB PNG can claim 50,000 x 50,000 pixels, and a GIF with a
1x1 screen can carry a 20,000 x 20,000 frame, so the server sizes every image the way TensorFlow's
decoders will (`tf.io.decode_image(channels=3, expand_animations=False)`) and refuses it before any
decoder allocates. Pure Python, and the walk is bounded: it stops with UnreadableImage after
MAX_SEGMENTS JPEG segments or MAX_FRAMES GIF frames.

What each decoder allocates (TF 2.x, read from core/lib/{gif,jpeg,png} and decode_bmp_op.cc):
- GIF: giflib's DGifSlurp decodes every frame at its own descriptor size (1 byte per pixel), whatever
  the screen says; TF then allocates one RGB canvas of the largest frame width x largest frame height
  (only the first frame is kept with expand_animations=False, but every frame is still decoded).
- JPEG: the RGB output (3 bytes per pixel); progressive and multi-scan files also buffer every DCT
  coefficient (2 bytes per sample of every component, at its sampling factor).
- PNG: the RGB output (16-bit and alpha are stripped to 8-bit RGB while reading; interlaced images
  are read into the same buffer).
- BMP: the RGB output; TF requires the payload to hold every row, so a BMP cannot be a bomb, but its
  header is checked the same way.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# JPEG start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8}

MAX_SEGMENTS = 1024  # JPEG segments before the frame header (a real file has a few dozen at most)
MAX_FRAMES = 4096  # GIF frames; each one is walked and decoded, so their count is bounded too
MAX_GIF_BLOCKS = 4096  # GIF extension blocks (comments, application data) between frames
_NOT_FILL = re.compile(rb"[^\xff]")
RGB = 3  # bytes per pixel of the decoded output: decode_image(channels=3), uint8


@dataclass(frozen=True)
class ImageInfo:
    """What the decoder will produce and allocate.

    `width` x `height` is the decoded image (for a GIF, the canvas of its largest frame, which is what
    TF allocates, not the logical screen). `pixels` is what --max-pixels bounds: the canvas, or for a
    GIF the sum of every frame's own area when that is larger, since every frame is decoded.
    `decode_bytes` is the decoder's peak allocation estimate for this image.
    """

    format: str
    width: int
    height: int
    frames: int = 1
    pixels: int = 0
    decode_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.pixels:
            object.__setattr__(self, "pixels", self.width * self.height)
        if not self.decode_bytes:
            object.__setattr__(self, "decode_bytes", self.width * self.height * RGB)


class UnreadableImage(ValueError):
    """The bytes are not a JPEG, PNG, GIF or BMP whose header could be read."""


def read_info(data: bytes) -> ImageInfo:
    """The format and decoder footprint of an encoded image; UnreadableImage if not recognised."""
    try:
        if data[:2] == b"\xff\xd8":
            return _jpeg(data)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return _png(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(data)
        if data[:2] == b"BM":
            return _bmp(data)
    except (struct.error, IndexError):
        raise UnreadableImage("the image header is truncated") from None
    raise UnreadableImage("not a JPEG, PNG, GIF or BMP image")


def _jpeg(data: bytes) -> ImageInfo:
    i = 2
    n = len(data)
    for _ in range(MAX_SEGMENTS):
        if i >= n:
            break
        if data[i] != 0xFF:
            raise UnreadableImage("corrupt JPEG header")
        # Fill bytes: at most a few in a real file; a regex skips a long run at C speed.
        found = _NOT_FILL.search(data, i)
        if found is None:
            break
        i = found.start()
        marker = data[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            raise UnreadableImage("corrupt JPEG header")
        if marker in _SOF:
            return _jpeg_frame(data, i, marker)
        i += length
    else:
        raise UnreadableImage(f"JPEG with more than {MAX_SEGMENTS} segments before its frame header")
    raise UnreadableImage("JPEG without a frame header")


def _jpeg_frame(data: bytes, i: int, marker: int) -> ImageInfo:
    height, width, components = struct.unpack(">HHB", data[i + 3 : i + 8])
    if components not in (1, 3, 4):
        raise UnreadableImage(f"JPEG with {components} colour components; send 1, 3 or 4")
    factors = []
    for c in range(components):
        sampling = data[i + 8 + 3 * c + 1]
        factors.append((max(sampling >> 4, 1), max(sampling & 15, 1)))
    hmax = max(h for h, _ in factors)
    vmax = max(v for _, v in factors)
    # libjpeg keeps a whole-image coefficient buffer for progressive and multi-scan files: 64
    # coefficients of 2 bytes per 8x8 block of every component, the image padded to whole MCUs.
    # Counted for every JPEG, since whether a baseline file is multi-scan is known only at its scans.
    mcu_cols = -(-width // (8 * hmax))
    mcu_rows = -(-height // (8 * vmax))
    coefficients = sum(mcu_cols * h * mcu_rows * v * 128 for h, v in factors)
    del marker  # every frame type is sized the same way, conservatively
    return ImageInfo("jpeg", width, height, decode_bytes=width * height * RGB + coefficients)


def _png(data: bytes) -> ImageInfo:
    if data[12:16] != b"IHDR":
        raise UnreadableImage("PNG whose first chunk is not IHDR")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if width > 2**31 - 1 or height > 2**31 - 1:
        raise UnreadableImage("PNG with a width or height above 2^31 - 1")
    allowed = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
    if depth not in allowed.get(colour, ()) or interlace not in (0, 1):
        raise UnreadableImage(f"PNG with an invalid header (bit depth {depth}, colour type {colour})")
    return ImageInfo("png", width, height)


def _gif(data: bytes) -> ImageInfo:
    flags = data[10]
    i = 13
    if flags & 0x80:
        i += 3 * (2 ** ((flags & 7) + 1))
    n = len(data)
    frames = blocks = 0
    frame_pixels = max_w = max_h = 0
    while i < n:
        block = data[i]
        if block == 0x2C:  # image descriptor: the decoder allocates this frame at its own size
            frames += 1
            if frames > MAX_FRAMES:
                raise UnreadableImage(f"GIF with more than {MAX_FRAMES} frames")
            w, h, local = struct.unpack("<HHB", data[i + 5 : i + 10])
            frame_pixels += w * h
            max_w, max_h = max(max_w, w), max(max_h, h)
            i += 10
            if local & 0x80:
                i += 3 * (2 ** ((local & 7) + 1))
            i = _skip_sub_blocks(data, i + 1)  # +1: LZW minimum code size
        elif block == 0x21:  # extension
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise UnreadableImage(f"GIF with more than {MAX_GIF_BLOCKS} extension blocks")
            i = _skip_sub_blocks(data, i + 2)
        else:  # 0x3B trailer, or garbage the decoder will judge
            break
    if frames == 0:
        raise UnreadableImage("GIF without an image")
    canvas = max_w * max_h
    return ImageInfo(
        "gif",
        max_w,
        max_h,
        frames,
        pixels=max(frame_pixels, canvas),
        decode_bytes=frame_pixels + canvas * RGB,
    )


def _skip_sub_blocks(data: bytes, i: int) -> int:
    # Sub-blocks are at most 255 bytes, so this loop runs len/256 times at worst; the caller bounds
    # the request size and runs it off the event loop.
    n = len(data)
    while i < n:
        size = data[i]
        i += size + 1
        if size == 0:
            break
    return i


def _bmp(data: bytes) -> ImageInfo:
    # Read the way TF's decode_bmp does (int32 width and height, 16-bit depth, whatever the header
    # size), so the check matches what the decoder will do.
    (offset,) = struct.unpack("<i", data[10:14])
    width, height = struct.unpack("<ii", data[18:26])
    (bits,) = struct.unpack("<H", data[28:30])
    if width <= 0:
        raise UnreadableImage("BMP with a width that is not positive")
    if bits not in (8, 24, 32):
        raise UnreadableImage(f"BMP with {bits} bits per pixel; send 8, 24 or 32")
    height = abs(height)  # negative: rows stored top-down
    row = (bits // 8 * width + 3) // 4 * 4
    if offset < 0 or len(data) != offset + row * height:
        raise UnreadableImage("BMP whose size does not match its header (truncated or padded)")
    return ImageInfo("bmp", width, height)
