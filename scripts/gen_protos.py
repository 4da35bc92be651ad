"""Regenerate the committed gRPC stubs in client/fovea/v1/ from proto/.

Usage: python scripts/gen_protos.py [--out DIR]

The stale-stub test calls `generate()` into a temporary folder and compares the result with what is
committed, so run this after every change to proto/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "client"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(proto_root.glob("fovea/**/*.proto"))


def generate(out: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) on every proto; return the files written."""
    from grpc_tools import protoc  # dev-only dependency, so import it late

    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out / "fovea").rglob("*_pb2*") if p.suffix in (".py", ".pyi"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: client/)")
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT, help="where fovea/**/*.proto live")
    args = parser.parse_args()
    for path in generate(args.out, args.proto_root):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
