"""The committed stubs in client/fovea/ (v1, inference) must be exactly what proto/ generates.

protoc runs in a subprocess: grpcio-tools' in-process compiler has crashed a pytest process that had
already loaded other protobuf descriptors.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
    for src in sorted((ROOT / "proto").rglob("*.proto")):
        dst = proto_copy / src.relative_to(ROOT / "proto")
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text()
        if src.parent.name == "inference":
            dst.write_text(text)  # unchanged: the copy regenerates the vendored stubs as committed
            continue
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


# tritonclient registers Triton's `inference.*` protos in the default pool; fovea's copies must load
# beside them in either import order (the "duplicate symbol 'inference.DataType'" of MLServer #1730).
_V2_IMPORT = "import fovea.server.v2_grpc"
_TRITON_IMPORT = "import tritonclient.grpc, tritonclient.grpc.aio"
_CHECK = (
    "from fovea.inference import grpc_service_pb2 as pb; "
    "from tritonclient.grpc import service_pb2 as tpb; "
    "from google.protobuf import descriptor_pool; "
    "assert pb.DESCRIPTOR.pool is not descriptor_pool.Default(); "
    "assert tpb.DESCRIPTOR.pool is descriptor_pool.Default(); "
    # The same bytes parse on both sides: the two copies are wire-compatible.
    "m = tpb.ModelInferRequest(model_name='m', raw_input_contents=[b'x']); "
    "assert pb.ModelInferRequest.FromString(m.SerializeToString()).model_name == 'm'; "
    "assert pb.ModelMetadataResponse(properties={'k': 'v'}).properties['k'] == 'v'"
)


@pytest.mark.parametrize("first", ["fovea", "tritonclient"])
def test_inference_stubs_import_beside_tritonclient(first: str, fovea_env: dict[str, str]) -> None:
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (the dev extra has it)")
    order = [_V2_IMPORT, _TRITON_IMPORT] if first == "fovea" else [_TRITON_IMPORT, _V2_IMPORT]
    code = "; ".join([*order, _CHECK])
    done = subprocess.run([sys.executable, "-c", code], env=fovea_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_default_pool_would_clash_with_tritonclient() -> None:
    """Why the private pool: the same file in the default pool beside tritonclient's is refused."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (the dev extra has it)")
    code = (
        "import tritonclient.grpc; "
        "from fovea.inference import grpc_service_pb2 as pb; "
        "from google.protobuf import descriptor_pb2, descriptor_pool; "
        "fdp = descriptor_pb2.FileDescriptorProto(); pb.DESCRIPTOR.CopyToProto(fdp); "
        "descriptor_pool.Default().Add(fdp)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT / "client")}, capture_output=True, text=True
    )
    assert done.returncode != 0 and "duplicate" in done.stderr, done.stderr[-2000:]


def test_vendored_protos_keep_their_licence_and_only_the_noted_change() -> None:
    text = (ROOT / "proto" / "inference" / "grpc_service.proto").read_text()
    assert text.startswith("// Copyright 2020-2024, NVIDIA CORPORATION & AFFILIATES. All rights reserved.")
    assert "map<string, string> properties = 6;" in text
    assert (ROOT / "proto" / "inference" / "model_config.proto").read_text().startswith("// Copyright")


def test_stale_check_covers_the_vendored_protos(tmp_path: Path) -> None:
    proto_copy = tmp_path / "proto"
    for src in sorted((ROOT / "proto").rglob("*.proto")):
        dst = proto_copy / src.relative_to(ROOT / "proto")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text().replace("map<string, string> properties = 6;", ""))
    fresh = _generate(tmp_path / "out", proto_copy)
    committed = _generated_files(ROOT / "client")
    assert fresh["fovea/inference/grpc_service_pb2.py"] != committed["fovea/inference/grpc_service_pb2.py"]
    assert fresh["fovea/v1/classifier_pb2.py"] == committed["fovea/v1/classifier_pb2.py"]


@pytest.mark.parametrize("first", ["tensorflow", "fovea"])
def test_tf_serving_protos_import_beside_tensorflow(first: str, fovea_env: dict[str, str]) -> None:
    """tensorflow-serving-api's messages reuse TensorFlow's own framework protos: no second copy."""
    pytest.importorskip(
        "tensorflow_serving.apis", reason="tensorflow-serving-api is not installed (server extra)"
    )
    imports = [
        "import tensorflow as tf",
        "import fovea.server.tfserving, fovea.server.v2_grpc, tritonclient.grpc",
    ]
    if first == "fovea":
        imports.reverse()
    code = "; ".join(
        [
            *imports,
            "from tensorflow_serving.apis import predict_pb2",
            "t = tf.make_tensor_proto([1, 2], dtype=tf.uint8)",
            "r = predict_pb2.PredictRequest(); r.inputs['images'].CopyFrom(t)",
            "assert list(tf.make_ndarray(r.inputs['images'])) == [1, 2]",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=fovea_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
