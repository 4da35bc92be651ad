"""`fovea perf-data`: perf_analyzer's --input-data JSON, written by the client alone (no TensorFlow)."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _image(path: Path, magic: bytes) -> bytes:
    data = magic + bytes(range(40))  # only the magic number matters to the client's check
    path.write_bytes(data)
    return data


def test_perf_data_writes_length_prefixed_base64_without_tensorflow(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    first = _image(folder / "a.jpg", b"\xff\xd8\xff\xe0")
    second = _image(folder / "b.png", b"\x89PNG\r\n\x1a\n")
    third = _image(tmp_path / "c.gif", b"GIF89a")
    out = tmp_path / "data.json"
    code = (
        "import sys; from fovea.cli import main; rc = main(sys.argv[1:]); "
        "assert 'tensorflow' not in sys.modules; sys.exit(rc)"
    )
    args = [sys.executable, "-c", code, "perf-data", str(folder), str(tmp_path / "c.gif"), "-o", str(out)]
    done = subprocess.run(
        args, env={"PYTHONPATH": str(ROOT / "client")}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "perf_analyzer -m MODEL-encoded --input-data" in done.stderr
    entries = json.loads(out.read_text())["data"]
    assert [e["image_bytes"]["shape"] for e in entries] == [[1], [1], [1]]
    raws = [base64.b64decode(e["image_bytes"]["b64"]) for e in entries]
    assert raws == [struct.pack("<I", len(d)) + d for d in (first, second, third)]


def test_perf_data_refuses_what_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    args = [
        sys.executable,
        "-m",
        "fovea.cli",
        "perf-data",
        str(tmp_path / "x.jpg"),
        "-o",
        str(tmp_path / "o.json"),
    ]
    done = subprocess.run(
        args, env={"PYTHONPATH": str(ROOT / "client")}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "not a JPEG, PNG, GIF or BMP image" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o.json").exists()
