"""Settings from flags and FOVEA_* variables, and the encoded-header reader (no TensorFlow needed)."""

from __future__ import annotations

import argparse
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from fovea.server import config, imageinfo
from PIL import Image


def parse(argv: list[str], env: dict[str, str] | None = None) -> config.Settings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_args(parser.parse_args(argv), env or {})


def test_defaults_flags_and_environment() -> None:
    s = parse(["--model-dir", "/m"])
    assert (s.model_dir, s.port, s.metrics_port, s.host, s.max_message_mb) == (
        "/m",
        8500,
        9090,
        "0.0.0.0",
        64,
    )
    assert s.reflection and s.warmup and s.version_policy == "latest"
    env = {
        "FOVEA_MODEL_DIR": "gs://bucket/models",
        "FOVEA_MAX_BATCH_SIZE": "16",
        "FOVEA_BATCH_TIMEOUT_MS": "2.5",
        "FOVEA_ALLOWED_BATCH_SIZES": "1, 4,16",
        "FOVEA_REFLECTION": "false",
        "FOVEA_LOG_FORMAT": "json",
        "FOVEA_VERSION_POLICY": "3,5",
    }
    s = parse([], env)
    assert s.model_dir == "gs://bucket/models" and s.max_batch_size == 16 and s.batch_timeout_ms == 2.5
    assert s.allowed_batch_sizes == (1, 4, 16) and not s.reflection and s.log_format == "json"
    assert s.specific_versions() == (3, 5)
    # A flag beats the environment.
    s = parse(["--max-batch-size", "8", "--reflection", "--allowed-batch-sizes", "8"], env)
    assert s.max_batch_size == 8 and s.reflection and s.allowed_batch_sizes == (8,)
    assert not parse(["--no-warmup", "--no-reflection"]).warmup


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch-size", "x"], "cannot read 'x'"),
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        (["--max-batch-size", "16", "--allowed-batch-sizes", "1,8"], "largest --allowed-batch-sizes"),
        (["--version-policy", "newest"], "--version-policy"),
        (["--tls-key", "k.pem"], "--tls-cert and --tls-key go together"),
        (["--max-queue-size", "0"], "--max-queue-size"),
    ],
)
def test_bad_values_raise_value_error(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse(argv)


def test_every_field_is_a_documented_flag() -> None:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    text = parser.format_help()
    for flag in (
        "--model-dir", "--port", "--metrics-port", "--host", "--max-batch-size", "--batch-timeout-ms",
        "--max-queue-size", "--poll-interval", "--grace-period", "--log-format", "--no-reflection",
        "--allowed-batch-sizes", "--max-in-flight-batches", "--version-policy", "--max-images-per-request",
        "--max-pixels", "--max-message-mb", "--gpu-memory-limit-mb", "--tls-cert", "--tls-key",
        "--tls-client-ca", "--warmup", "--no-warmup", "--http-port",
    ):  # fmt: skip
        assert flag in text, flag
    assert "FOVEA_MAX_BATCH_SIZE" in text


def encoded(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_header_dimensions_without_decoding(fmt: str) -> None:
    array = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    info = imageinfo.read_info(encoded(array, fmt))
    assert (info.format, info.width, info.height, info.frames) == (fmt.lower(), 53, 37, 1)


def test_progressive_jpeg_and_animated_gif() -> None:
    array = np.zeros((40, 30, 3), np.uint8)
    assert imageinfo.read_info(encoded(array, "JPEG", progressive=True)).width == 30
    frames = [Image.fromarray(np.full((20, 10, 3), v, np.uint8)) for v in (0, 100, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    info = imageinfo.read_info(buf.getvalue())
    assert (info.width, info.height, info.frames, info.pixels) == (10, 20, 3, 600)


def test_unreadable_headers() -> None:
    for data in (b"hello", b"\x89PNG\r\n\x1a\n\x00", b"\xff\xd8\xff\xd9", b"GIF89a"):
        with pytest.raises(imageinfo.UnreadableImage):
            imageinfo.read_info(data)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + struct.pack(">II", 60000, 60000)
        + b"\x08\x02\0\0\0"
    )
    assert imageinfo.read_info(bomb).pixels == 3_600_000_000


# Modules below the transports: the core, the batcher and the manager's parts. None may load grpc,
# protobuf or TensorFlow (the loader is handed to the manager by app.py).
_TRANSPORT_FREE = (
    "core",
    "batcher",
    "batch_admission",
    "batch_costs",
    "batch_formation",
    "config",
    "lease",
    "source",
    "servable",
    "manager",
    "metrics",
    "errors",
)


def test_core_batcher_and_manager_import_neither_grpc_nor_tensorflow() -> None:
    import subprocess
    import sys

    from _serving import subprocess_env

    modules = ", ".join(f"fovea.server.{m}" for m in _TRANSPORT_FREE)
    code = (
        f"import sys; import {modules}; "
        "print(sorted(m for m in ('tensorflow', 'grpc', 'google.protobuf') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_the_loader_imports_tensorflow() -> None:
    import ast

    import fovea.server

    importers = []
    for path in sorted(Path(fovea.server.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n == "tensorflow" or n.startswith("tensorflow.") for n in names):
                importers.append(path.name)
    assert sorted(set(importers)) == ["loader.py"]
