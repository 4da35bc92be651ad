"""The decompression-bomb guard sizes every image the way TensorFlow's decoders allocate it.

Ordinary animated GIFs still pass (test_server_config.py). Past bombs stay here as regression cases: a GIF with a 1x1 screen and a 20000x20000 frame took 1.5 GB
before the guard read frame descriptors.
"""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from _bombs import stub_gif as gif
from fovea.server import imageinfo
from PIL import Image


def encoded(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_a_gif_frame_larger_than_its_screen_is_sized_by_the_frame() -> None:
    info = imageinfo.read_info(gif((1, 1), [(20000, 20000)]))
    assert (info.width, info.height, info.pixels) == (20000, 20000, 400_000_000)
    assert info.decode_bytes == 400_000_000 * 4  # 1 byte per pixel in giflib, 3 in the RGB canvas


def test_every_gif_frame_counts_and_the_canvas_spans_the_largest() -> None:
    three = imageinfo.read_info(gif((1, 1), [(20000, 20000)] * 3))
    assert (three.frames, three.pixels) == (3, 1_200_000_000)
    # Two thin frames: tiny each, but TF's canvas is the widest x the tallest.
    cross = imageinfo.read_info(gif((1, 1), [(20000, 1), (1, 20000)]))
    assert (cross.width, cross.height, cross.pixels) == (20000, 20000, 400_000_000)


def test_jpeg_counts_the_coefficient_buffer() -> None:
    array = np.zeros((64, 48, 3), np.uint8)
    for progressive in (False, True):
        info = imageinfo.read_info(encoded(array, "JPEG", progressive=progressive, subsampling=0))
        assert (info.width, info.height) == (48, 64)
        # 4:4:4: 3 bytes of output plus 3 components x 2 bytes of coefficients per pixel.
        assert info.decode_bytes == 48 * 64 * 9


def test_the_header_walk_is_bounded() -> None:
    app = b"\xff\xe1" + struct.pack(">H", 4) + b"xx"
    with pytest.raises(imageinfo.UnreadableImage, match="segments"):
        imageinfo.read_info(b"\xff\xd8" + app * (imageinfo.MAX_SEGMENTS + 1))
    with pytest.raises(imageinfo.UnreadableImage, match="frames"):
        imageinfo.read_info(gif((1, 1), [(1, 1)] * (imageinfo.MAX_FRAMES + 1)))
    comment = b"\x21\xfe\x01x\x00"
    many_blocks = gif((1, 1), [(1, 1)])[:-1] + comment * (imageinfo.MAX_GIF_BLOCKS + 1) + b"\x3b"
    with pytest.raises(imageinfo.UnreadableImage, match="extension blocks"):
        imageinfo.read_info(many_blocks)
    # Megabytes of JPEG fill bytes are skipped at C speed, not one Python step per byte.
    fill = b"\xff\xd8" + b"\xff" * 32_000_000 + b"\xd9"
    start = time.process_time()
    with pytest.raises(imageinfo.UnreadableImage):
        imageinfo.read_info(fill)
    print(f"32 MB of fill bytes: {time.process_time() - start:.3f} s of CPU")


def test_png_and_bmp_headers_are_checked_like_their_decoders() -> None:
    def png(depth: int, colour: int, chunk: bytes = b"IHDR") -> bytes:
        return (
            b"\x89PNG\r\n\x1a\n"
            + struct.pack(">I", 13)
            + chunk
            + struct.pack(">IIBBBBB", 5, 7, depth, colour, 0, 0, 1)
        )

    assert imageinfo.read_info(png(16, 6)).pixels == 35  # 16-bit, RGBA, interlaced: still 8-bit RGB out
    for bad in (png(3, 2), png(8, 5), png(8, 2, b"IDAT")):
        with pytest.raises(imageinfo.UnreadableImage):
            imageinfo.read_info(bad)

    def bmp(width: int, height: int, bits: int = 24, extra: int = 0) -> bytes:
        row = (bits // 8 * abs(width) + 3) // 4 * 4
        payload = row * abs(height) + extra
        header = b"BM" + struct.pack("<IHHI", 54 + payload, 0, 0, 54)
        return (
            header
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 0, 0, 0, 0)
            + b"\0" * payload
        )

    assert imageinfo.read_info(bmp(5, -3)).pixels == 15  # a negative height is a top-down BMP
    for bad in (bmp(-5, 3), bmp(5, 3, bits=16), bmp(5, 3, extra=1)):
        with pytest.raises(imageinfo.UnreadableImage):
            imageinfo.read_info(bad)
    big = bmp(5, 3)
    with pytest.raises(imageinfo.UnreadableImage, match="size"):
        imageinfo.read_info(big[:22] + struct.pack("<i", 30000) + big[26:])  # claims 30000 rows


_MEASURE = r"""
import resource, sys
import tensorflow as tf

decode = lambda b: tf.io.decode_image(b, channels=3, expand_animations=False).shape
decode(tf.io.read_file(sys.argv[2]))  # load the kernels and thread pools first
tensor = tf.io.read_file(sys.argv[1])  # one copy of the encoded bytes: the request's, not the decoder's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
shape = decode(tensor)
print(shape[0], shape[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gif", "jpeg", "png", "bmp"])
def test_decode_bytes_bounds_what_the_decoder_allocates(fmt: str, tmp_path) -> None:
    import subprocess
    import sys

    from _serving import subprocess_env
    from PIL import ImageFile

    ImageFile.MAXBLOCK = 2**27  # a progressive JPEG of this size needs a larger encoder buffer
    side = 3000
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    if fmt == "gif":
        data = bytearray(encoded(noise[:, :, 0] // 64 * 64, "GIF"))
        data[6:10] = b"\x01\x00\x01\x00"  # a 1x1 screen around the 3000x3000 frame
    elif fmt == "jpeg":
        data = bytearray(encoded(noise, "JPEG", progressive=True, subsampling=0, quality=95))
    else:
        data = bytearray(encoded(noise, fmt.upper()))
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "small").write_bytes(encoded(noise[:8, :8], "GIF" if fmt == "gif" else fmt.upper()))
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "big"), str(tmp_path / "small")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    height, width, grew = map(int, out.stdout.split())
    estimate = imageinfo.read_info(bytes(data)).decode_bytes
    print(
        f"{fmt}: decoded {width}x{height}, peak RSS grew {grew / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB"
    )
    assert (height, width) == (side, side)
    # The estimate must cover what was allocated (8 MiB of slack for the allocator's own overhead).
    assert grew <= estimate + 8 * 2**20
