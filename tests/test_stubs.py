"""The committed stubs in client/fovea/v1/ must be exactly what proto/ generates.

protoc runs in a subprocess: grpcio-tools' in-process compiler has crashed a pytest process that had
already loaded other protobuf descriptors.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_protos.py"


def _generate(out: Path, proto_root: Path = ROOT / "proto") -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--proto-root", str(proto_root)],
        check=True,
        capture_output=True,
    )
    return _generated_files(out)


def _generated_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.glob("fovea/**/*_pb2*") if p.suffix in (".py", ".pyi"))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    fresh = _generate(tmp_path / "out")
    committed = _generated_files(ROOT / "client")
    assert fresh, "protoc generated nothing"
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"stubs are stale, run `python scripts/gen_protos.py`: {stale}"


def test_stale_check_detects_a_proto_change(tmp_path: Path) -> None:
    """Edit a copy of the proto: what it generates must no longer match the committed stubs."""
    proto_copy = tmp_path / "proto"
    for src in sorted((ROOT / "proto").glob("fovea/**/*.proto")):
        dst = proto_copy / src.relative_to(ROOT / "proto")
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text()
        edited = text.replace(
            "bool return_probabilities = 4;", "bool return_probabilities = 4;\n  string x = 99;"
        )
        assert edited != text, "the edit point moved; update this test"
        dst.write_text(edited)
    assert _generate(tmp_path / "out", proto_copy) != _generated_files(ROOT / "client")


def test_stubs_import_without_tensorflow() -> None:
    code = (
        "import sys; from fovea.v1 import classifier_pb2, classifier_pb2_grpc; "
        "assert classifier_pb2.DESCRIPTOR.package == 'fovea.v1'; "
        "assert hasattr(classifier_pb2_grpc, 'ClassifierServiceStub'); "
        "assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(ROOT / "client")})
