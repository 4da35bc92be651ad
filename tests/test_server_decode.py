"""The server's decode (loader.py) gives exactly the export contract's pixels (decode_and_resize, what
the bytes signature runs), for images at the model's size, where it skips the resize as an identity,
and for images of other sizes, which it resizes."""

from __future__ import annotations

import io

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the decode tests need the server extra")

from _models import export_tiny  # noqa: E402
from fovea.server import loader  # noqa: E402
from fovea.trainer.export import decode_and_resize  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    loaded = loader.load(str(export_tiny(tmp_path_factory.mktemp("models"), "tiny", SIZE)), "tiny", 1)
    yield loaded
    loaded.release()


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


SHAPES = [(SIZE, SIZE, 3), (SIZE, SIZE), (SIZE, SIZE, 4), (37, 19, 3), (SIZE, 30, 3)]


# Only PNG of these has an alpha channel: RGBA is tried in PNG alone.
@pytest.mark.parametrize(
    ("fmt", "shape"),
    [(fmt, shape) for fmt in ("JPEG", "PNG", "BMP") for shape in SHAPES if fmt == "PNG" or shape[2:] != (4,)],
)
def test_decode_matches_the_contract_bit_for_bit(model, shape: tuple[int, ...], fmt: str) -> None:
    rng = np.random.default_rng(sum(shape))
    # Smooth content as well as noise: JPEG's artefacts differ between the two.
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    smooth = (128 + 100 * np.sin(x / 3.0 + y / 5.0)).astype(np.uint8)
    for array in (
        rng.integers(0, 256, shape, dtype=np.uint8),
        np.broadcast_to(smooth[..., None], shape).copy() if len(shape) == 3 else smooth,
    ):
        data = encode(array, fmt)
        want = decode_and_resize(tf.constant(data), SIZE, SIZE).numpy()
        got = model.decode(data)
        assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(got, want)
