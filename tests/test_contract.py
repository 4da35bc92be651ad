"""The export contract: TensorFlow-free, one version rule, metadata that round-trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from fovea import contract
from fovea.contract import ModelMetadata


def test_contract_imports_without_tensorflow() -> None:
    # A meta-path finder that refuses TensorFlow: the import must not even try it.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'grpc'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fovea.contract as c\n"
        "print(c.SIGNATURE_IMAGES, sorted(m for m in sys.modules if m.startswith('tensorflow')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["serving_default", "[]"]


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("1", 1),
        ("12/", 12),
        ("0", None),
        ("007", 7),
        (".tmp-1", None),
        ("-3", None),
        ("v2", None),
        ("\u0661", None),
    ],
)
def test_version_rule(name: str, version: int | None) -> None:
    assert contract.version_of(name) == version


def test_published_versions_need_saved_model(tmp_path: Path) -> None:
    for name in ("1", "2", "3", ".tmp-abc", "x"):
        (tmp_path / name).mkdir()
    for name in ("1", "3", ".tmp-abc"):
        (tmp_path / name / contract.SAVED_MODEL_FILE).write_bytes(b"")
    assert contract.versions_in(p.name for p in tmp_path.iterdir()) == [1, 2, 3]
    assert contract.local_published_versions(tmp_path) == [1, 3]
    assert contract.local_published_versions(tmp_path / "missing") == []


def test_published_versions_pass_storage_errors_through() -> None:
    def broken(path: str) -> list[str]:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        contract.published_versions("gs://bucket/m", broken, lambda p: True)


def test_metadata_round_trips() -> None:
    meta = ModelMetadata(
        name="flowers",
        version=3,
        labels=["a", "b", "c"],
        input_height=96,
        input_width=64,
        backbone="resnet50",
        metrics={"test_accuracy": 0.9, "best_epoch": 4, "per_class": {"a": 1.0}},
        config={"epochs": None},
        created_at="2026-11-25T00:00:00+00:00",
        parent="models/flowers/2",
    )
    text = meta.to_json()
    doc = json.loads(text)
    assert doc["format"] == contract.METADATA_FORMAT
    assert doc["input_size"] == {"height": 96, "width": 64}
    assert doc["signatures"]["images"]["name"] == contract.SIGNATURE_IMAGES
    back = ModelMetadata.from_json(text)
    assert back == meta
    assert back.numeric_metrics() == {"test_accuracy": 0.9, "best_epoch": 4.0}
    # The folder's name and number win over what the file says.
    assert ModelMetadata.from_json(text, name="other", version=9).version == 9


@pytest.mark.parametrize("text", ["{", "[]", '{"input_size": {"height": "tall"}}'])
def test_bad_metadata_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"fovea\.json"):
        ModelMetadata.from_json(text)


def test_labels_text() -> None:
    assert contract.parse_labels(contract.format_labels(["cat", "dog"]) + "\n") == ["cat", "dog"]


def test_the_trainer_never_imports_the_server() -> None:
    # The two share only the contract: a trainer module importing the server would couple their releases.
    import ast

    root = Path(__file__).resolve().parent.parent / "trainer" / "fovea" / "trainer"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("fovea.server")]
    assert offenders == []
