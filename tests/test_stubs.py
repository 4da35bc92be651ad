"""The committed stubs in client/fovea/v1/ must be exactly what proto/ generates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generated_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("fovea/**/*_pb2*.py*"))}


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    gen = _load_generator()
    gen.generate(tmp_path)
    fresh = _generated_files(tmp_path)
    committed = _generated_files(ROOT / "client")
    assert fresh, "protoc generated nothing"
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"stubs are stale, run `python scripts/gen_protos.py`: {stale}"


def test_stale_check_detects_a_proto_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Edit a copy of the proto and check that generation no longer matches what is committed."""
    gen = _load_generator()
    proto_copy = tmp_path / "proto"
    for src in gen.proto_files():
        dst = proto_copy / src.relative_to(gen.PROTO_ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(
            src.read_text().replace(
                "bool return_probabilities = 4;", "bool return_probabilities = 4;\n  string extra = 99;"
            )
        )
    monkeypatch.setattr(gen, "PROTO_ROOT", proto_copy)
    out = tmp_path / "out"
    out.mkdir()
    gen.generate(out)
    assert _generated_files(out) != _generated_files(ROOT / "client")


def test_stubs_import_without_tensorflow() -> None:
    from fovea.v1 import classifier_pb2, classifier_pb2_grpc

    assert classifier_pb2.DESCRIPTOR.package == "fovea.v1"
    assert hasattr(classifier_pb2_grpc, "ClassifierServiceStub")
    assert "tensorflow" not in sys.modules
