"""Regenerate the committed gRPC stubs in client/fovea/ from proto/.

Usage: python scripts/gen_protos.py [--out DIR]

Two families of stubs:
- fovea.v1 (proto/fovea/**): fovea's own API, generated as protoc writes it.
- fovea.inference (proto/inference/*.proto): Triton's vendored KServe v2 / Open Inference Protocol
  protos. tritonclient, MLServer and others register the same `inference.*` names in protobuf's
  default descriptor pool, and a second registration fails at import ("duplicate symbol"). So these
  stubs are rewritten to load into fovea's private pool (client/fovea/inference/_pool.py) and to
  import each other as `fovea.inference.*` instead of as top-level modules.

The stale-stub test calls `generate()` into a temporary folder and compares the result with what is
committed, so run this after every change to proto/.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "client"
# proto/inference/X.proto is generated as the Python module fovea.inference.X_pb2.
INFERENCE_DIR = "inference"
INFERENCE_PACKAGE = "fovea.inference"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(proto_root.glob("fovea/**/*.proto"))


def inference_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((proto_root / INFERENCE_DIR).glob("*.proto"))


def _protoc(include_root: Path, files: list[str], out: Path) -> None:
    from grpc_tools import protoc  # dev-only dependency, so import it late

    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{include_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def _private_pool(text: str, modules: set[str]) -> str:
    """Load into fovea's private descriptor pool; import sibling stubs from their package."""
    if "_descriptor_pool.Default().AddSerializedFile(" in text:
        text = text.replace(
            "_descriptor_pool.Default().AddSerializedFile(", "_fovea_pool.POOL.AddSerializedFile("
        )
        text = text.replace(
            "# @@protoc_insertion_point(imports)",
            f"from {INFERENCE_PACKAGE} import _pool as _fovea_pool\n# @@protoc_insertion_point(imports)",
            1,
        )
    for module in modules:
        text = re.sub(
            rf"^import {module} as (\w+)$",
            rf"from {INFERENCE_PACKAGE} import {module} as \1",
            text,
            flags=re.MULTILINE,
        )
    return text


def generate_inference(out: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    files = inference_files(proto_root)
    if not files:
        return []
    target = out / Path(*INFERENCE_PACKAGE.split("."))
    target.mkdir(parents=True, exist_ok=True)
    modules = {f"{p.stem}_pb2" for p in files} | {f"{p.stem}_pb2_grpc" for p in files}
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        # The vendored files import each other by bare name ("model_config.proto"), so their folder
        # is the include root, as in Triton's own build.
        _protoc(proto_root / INFERENCE_DIR, [p.name for p in files], Path(tmp))
        for generated in sorted(Path(tmp).iterdir()):
            if "_pb2" not in generated.name or generated.suffix not in (".py", ".pyi"):
                continue
            dest = target / generated.name
            dest.write_text(_private_pool(generated.read_text(), modules))
            written.append(dest)
    return written


def generate(out: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) on every proto; return the files written."""
    files = [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]
    _protoc(proto_root, files, out)
    generate_inference(out, proto_root)
    return sorted(p for p in (out / "fovea").rglob("*_pb2*") if p.suffix in (".py", ".pyi"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: client/)")
    parser.add_argument(
        "--proto-root", type=Path, default=PROTO_ROOT, help="where fovea/**/*.proto and inference/ live"
    )
    args = parser.parse_args()
    for path in generate(args.out, args.proto_root):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
