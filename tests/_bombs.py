"""Encoded images that are small on the wire and huge in a decoder: the fuzz test's and regressions' bombs."""

from __future__ import annotations

import struct
import zlib


def constant_gif(width: int, height: int, screen: tuple[int, int] = (1, 1), frames: int = 1) -> bytes:
    """A real, decodable GIF: `frames` width x height frames of colour 0 inside a `screen`-sized screen.

    The LZW stream is coded as ever longer runs, so a 20000x20000 frame takes 271 KB: the exact bomb
    that raised a server's RSS by 1.5 GB when only the screen was checked.
    """
    min_size, clear, eoi = 2, 4, 5
    out = bytearray()
    acc = nbits = 0

    def emit(code: int, size: int) -> None:
        nonlocal acc, nbits
        acc |= code << nbits
        nbits += size
        while nbits >= 8:
            out.append(acc & 255)
            acc >>= 8
            nbits -= 8

    size, next_code, longest = min_size + 1, eoi + 1, 1  # runs of 1..longest pixels have codes
    emit(clear, size)
    remaining = width * height
    while remaining:
        run = min(longest, remaining)
        emit(0 if run == 1 else eoi + run - 1, size)
        remaining -= run
        if not remaining:
            break
        longest += 1  # the decoder adds this run plus the next pixel: a run one longer
        next_code += 1
        if next_code > (1 << size) and size < 12:
            size += 1
        if next_code >= 4096:
            emit(clear, size)
            size, next_code, longest = min_size + 1, eoi + 1, 1
    emit(eoi, size)
    if nbits:
        out.append(acc & 255)
    data = bytes(out)
    blocks = b"".join(bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255))
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x81, 0, 0) + bytes(12)  # a 4-colour global table
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return head + (descriptor + bytes([min_size]) + blocks + b"\x00") * frames + b"\x3b"


def stub_gif(screen: tuple[int, int], frames: list[tuple[int, int]], data: bytes = b"\x01\x00") -> bytes:
    """A GIF whose descriptors claim these frame sizes; the LZW data is a stub that will not decode."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0)
    for w, h in frames:
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x08" + bytes([len(data)]) + data + b"\x00"
    return out + b"\x3b"


def zeros_png(width: int, height: int) -> bytes:
    """A real, decodable grey PNG of zeros: a few KB per megapixel."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = zlib.compress(b"\0" * ((width + 1) * height), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def header_only(fmt: str, width: int, height: int) -> bytes:
    """Just enough header to claim width x height; the decoder would fail on the missing data."""
    if fmt == "png":
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0"
    if fmt == "jpeg":
        sof = (
            b"\xff\xc0"
            + struct.pack(">HBHHB", 17, 8, height, width, 3)
            + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
        )
        return b"\xff\xd8" + sof + b"\xff\xd9"
    if fmt == "gif":
        return stub_gif((1, 1), [(width, height)])
    if fmt == "bmp":
        header = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
        return header + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    raise ValueError(fmt)
