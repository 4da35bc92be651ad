"""The must-show run: resnet50 --weights none at 64 px on the demo data, trained once per session.

Every test that needs a fully trained model reuses the one session fixture.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the trainer tests need the trainer extra")
# The session fixture trains for several minutes (the audit, calibration and the OOD measurement run
# after it); on a shared 2-core machine it passed 600 s, pytest's default limit here.
pytestmark = pytest.mark.timeout(1800)

from fovea import contract  # noqa: E402
from fovea.trainer.config import TrainConfig  # noqa: E402
from fovea.trainer.train import TrainResult, run  # noqa: E402

# The run the issue asks for; everything else is the trainer's defaults for --weights none.
MUST_SHOW_FLAGS = {"backbone": "resnet50", "weights": "none", "input_size": 64, "demo_data_if_empty": True}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, float]:
    root = tmp_path_factory.mktemp("accuracy")
    cfg = TrainConfig(
        data=str(root / "data"), models=str(root / "models"), name="demo", verbose=2, **MUST_SHOW_FLAGS
    )
    started = time.monotonic()
    result = run(cfg, log=lambda msg: print(msg, flush=True))
    seconds = time.monotonic() - started
    print(f"must-show run: {seconds:.0f} s, test accuracy {result.metrics.test_accuracy:.4f}")
    return result, seconds


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_demo_run_reaches_the_accuracy(trained: tuple[TrainResult, float]) -> None:
    result, seconds = trained
    m = result.metrics
    print(
        f"resnet50 --weights none, 64 px: {seconds:.0f} s in all (timing is reported, not asserted), "
        f"test accuracy {m.test_accuracy:.4f} on {m.test.support} images, "
        f"phase 1 {m.phase1_epochs} epochs, phase 2 {m.phase2_epochs} epochs"
    )
    assert m.test.support >= 40
    assert m.test_accuracy >= 0.9


@pytest.mark.slow
def test_published_version_loads_and_both_signatures_match_the_trainer(
    trained: tuple[TrainResult, float],
) -> None:
    result, _ = trained
    path = Path(result.version_path)
    meta = json.loads((path / "assets.extra" / "fovea.json").read_text())
    assert meta["labels"] == result.dataset.labels and meta["backbone"] == "resnet50"
    assert meta["input_size"] == {"height": 64, "width": 64}
    assert meta["metrics"]["test_accuracy"] == pytest.approx(result.metrics.test_accuracy)
    for name in ("metrics.json", "training_curves.png", "confusion_matrix.png"):
        assert (path / "report" / name).is_file(), name

    from PIL import Image

    files = result.dataset.files["test"][:16]
    images = np.stack(
        [np.asarray(Image.open(f).convert("RGB").resize((64, 64), Image.BILINEAR)) for f in files]
    )
    assert images.shape[1:] == (64, 64, 3)  # the demo images are 64 px: no resize happens
    own = result.model(images.astype(np.float32), training=False).numpy()

    loaded = tf.saved_model.load(str(path))
    by_pixels = loaded.signatures[contract.SIGNATURE_IMAGES](images=tf.constant(images))[
        contract.OUTPUT
    ].numpy()
    by_bytes = loaded.signatures[contract.SIGNATURE_BYTES](
        image_bytes=tf.constant([_png(im) for im in images])
    )[contract.OUTPUT].numpy()
    assert by_pixels.shape == own.shape == (len(files), len(result.dataset.labels))
    assert np.abs(by_pixels - own).max() <= 1e-4
    assert np.abs(by_bytes - own).max() <= 1e-4


@pytest.mark.slow
def test_demo_report_page_renders(trained: tuple[TrainResult, float], tmp_path: Path) -> None:
    from _browser import render

    result, _ = trained
    index = Path(result.report_index)
    png = tmp_path / "demo_report.png"
    pixels = render(index, png)
    assert pixels.std() > 20 and (pixels[2000:] < 200).mean() > 0.01, (
        "the page did not render down to its figures"
    )
    for name in ("augmentation.png", "mistakes.png", "training_curves.png", "confusion_matrix.png"):
        assert (index.parent / name).stat().st_size > 5_000, name
    print(f"demo report {index} rendered to {png}")
