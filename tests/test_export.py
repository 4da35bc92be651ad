"""The export contract: layout, metadata, atomic versions, and two signatures that agree."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the export tests need the trainer extra")

from _models import LABELS, build_tiny_model  # noqa: E402
from fovea import contract  # noqa: E402
from fovea.trainer import export  # noqa: E402


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_export_layout_and_signatures(tmp_path: Path) -> None:
    model = build_tiny_model(32)
    path = Path(
        export.export_model(
            model,
            models_dir=str(tmp_path),
            name="m",
            labels=LABELS,
            input_size=(32, 32),
            backbone="tiny-cnn",
            metrics={"test_accuracy": 0.75},
            config={"epochs": 1},
        )
    )
    assert path == tmp_path / "m" / "1"
    assert (path / "saved_model.pb").is_file()
    assert (path / "assets" / "labels.txt").read_text().splitlines() == list(LABELS)
    meta = json.loads((path / "assets.extra" / "fovea.json").read_text())
    assert meta["version"] == 1 and meta["labels"] == list(LABELS)
    assert meta["input_size"] == {"height": 32, "width": 32}
    assert meta["metrics"]["test_accuracy"] == 0.75
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"], "temporary folder left behind"

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    expected = model(images.astype(np.float32), training=False).numpy()
    loaded = tf.saved_model.load(str(path))
    by_pixels = loaded.signatures[contract.SIGNATURE_IMAGES](images=tf.constant(images))[
        contract.OUTPUT
    ].numpy()
    encoded = tf.constant([_png(im) for im in images])
    by_bytes = loaded.signatures[contract.SIGNATURE_BYTES](image_bytes=encoded)[contract.OUTPUT].numpy()
    np.testing.assert_allclose(by_pixels, expected, atol=1e-5)
    np.testing.assert_allclose(by_bytes, expected, atol=1e-5)

    second = export.export_model(
        model, models_dir=str(tmp_path), name="m", labels=LABELS, input_size=(32, 32), backbone="tiny-cnn"
    )
    assert Path(second) == tmp_path / "m" / "2"
    assert export.list_versions(str(tmp_path / "m")) == [1, 2]


def _saved_function_names(version: Path) -> list[str]:
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((version / contract.SAVED_MODEL_FILE).read_bytes())
    return [f.signature.name for f in saved.meta_graphs[0].graph_def.library.function]


def test_export_keeps_the_variables_by_name_not_the_keras_layers_functions(tmp_path: Path) -> None:
    """A server loads every function a SavedModel holds: the Keras object would add each layer's call
    functions (714 for ResNet50), which made a load 10 s instead of 3 and left the old version's
    garbage for one long collection in a hot swap. A retrain still finds the weights by name, in this
    format and in the one before it."""
    from fovea.trainer.parent import saved_variables

    model = build_tiny_model(32)
    path = Path(
        export.export_model(
            model, models_dir=str(tmp_path), name="m", labels=LABELS, input_size=(32, 32), backbone="tiny-cnn"
        )
    )
    names = _saved_function_names(path)
    assert names and not [n for n in names if "layer_call" in n], names
    # Each serving function once: signatures traced apart from the module's attributes would save
    # the whole network a second time, and every load would rebuild both.
    for function in ("serve_images", "serve_bytes"):
        assert len([n for n in names if re.fullmatch(rf"__inference_{function}_\d+", n)]) == 1, names
    expected = {v.name: v.numpy() for v in model.variables}
    kept = {v.name: v.numpy() for v in saved_variables(tf.saved_model.load(str(path)))}
    assert kept.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(kept[name], value)

    old = tf.Module()  # how versions were exported before: the Keras object on the root
    old.model = model
    tf.saved_model.save(old, str(tmp_path / "old"))
    assert [n for n in _saved_function_names(tmp_path / "old") if "layer_call" in n]
    assert {v.name for v in saved_variables(tf.saved_model.load(str(tmp_path / "old")))} == expected.keys()
    tf.saved_model.save(tf.Module(), str(tmp_path / "other"))  # another exporter's: nothing to copy
    assert saved_variables(tf.saved_model.load(str(tmp_path / "other"))) == []


def test_list_versions_ignores_temporary_and_odd_names(tmp_path: Path) -> None:
    for name in ["3", "10", ".tmp-abc", "0", "x1", "7"]:
        (tmp_path / name).mkdir()
    assert export.list_versions(str(tmp_path)) == [3, 7, 10]
    assert export.list_versions(str(tmp_path / "missing")) == []


def test_a_version_taken_between_listing_and_rename_makes_the_exporter_take_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "m"
    (root / "1").mkdir(parents=True)
    (root / "1" / "saved_model.pb").write_bytes(b"another exporter's version")
    real = export.list_versions
    calls: list[list[int]] = []

    def stale_once(model_root: str) -> list[int]:
        # The first listing is taken before the other exporter's rename landed.
        calls.append([] if not calls else real(model_root))
        return calls[-1]

    monkeypatch.setattr(export, "list_versions", stale_once)
    path = export.export_model(
        build_tiny_model(32), models_dir=str(tmp_path), name="m", labels=LABELS, input_size=(32, 32),
        backbone="tiny-cnn",
    )  # fmt: skip
    assert calls == [[], [1]], "the collision retry did not run"
    assert Path(path) == root / "2"
    assert (root / "1" / "saved_model.pb").read_bytes() == b"another exporter's version"
    assert json.loads((root / "2" / "assets.extra" / "fovea.json").read_text())["version"] == 2


def test_on_an_object_store_saved_model_pb_is_copied_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local folder stands in for gs://: the exporter is told renames are copies, as they are there.
    monkeypatch.setattr(export, "renames_atomically", lambda path: False)
    copied: list[str] = []
    real_copy = tf.io.gfile.copy

    def record(src: str, dst: str, overwrite: bool = False) -> None:
        copied.append(dst)
        real_copy(src, dst, overwrite=overwrite)

    monkeypatch.setattr(tf.io.gfile, "copy", record)
    path = export.export_model(
        build_tiny_model(32), models_dir=str(tmp_path), name="m", labels=LABELS, input_size=(32, 32),
        backbone="tiny-cnn",
    )  # fmt: skip
    published = [c for c in copied if c.startswith(path + "/")]
    assert published[-1] == f"{path}/saved_model.pb", published
    assert any("/variables/" in c for c in published) and any(c.endswith("fovea.json") for c in published)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"], "the temporary folder was left"
    tf.saved_model.load(path)  # whole
