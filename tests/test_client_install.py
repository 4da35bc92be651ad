"""`pip install .` in a fresh venv gives the thin client: no TensorFlow, and `fovea predict` works."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What a `pip install .` reads; copied so the build never writes into the source tree.
_PROJECT_FILES = ["pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"]
_PROJECT_DIRS = ["client", "server", "trainer", "devtools", "proto"]


def _pypi_reachable() -> str | None:
    """None when pypi.org answers on 443, else why not."""
    try:
        with socket.create_connection(("pypi.org", 443), timeout=5):
            return None
    except OSError as exc:
        return f"pypi.org:443 is unreachable ({exc})"


def _copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in _PROJECT_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    for name in _PROJECT_DIRS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def test_pip_install_is_the_thin_client_without_tensorflow(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    project = _copy_project(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
    python = bin_dir / "python"
    # Nothing from this tree or the outer environment may leak in: the venv must stand alone.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}

    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(project)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if install.returncode != 0:
        unreachable = _pypi_reachable()
        if unreachable:
            pytest.skip(f"cannot install from the package index: {unreachable}")
        pytest.fail(f"pip install . failed:\n{install.stdout}\n{install.stderr}")

    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    names = {line.split("==")[0].lower() for line in listed.splitlines() if line}
    assert "fovea" in names and "grpcio" in names and "numpy" in names
    assert not {n for n in names if n.startswith(("tensorflow", "tf-keras", "keras"))}, names
    assert "grpcio-health-checking" not in names  # the client's health check does without it

    check = "import sys, fovea.client, fovea.contract, fovea.inference.grpc_service_pb2; print(sorted(m for m in ('tensorflow', 'PIL') if m in sys.modules))"
    proc = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

    for command in ("predict", "health", "perf-data"):
        proc = subprocess.run(
            [str(bin_dir / "fovea"), command, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert proc.returncode == 0, proc.stderr
        assert f"usage: fovea {command}" in proc.stdout

    # What needs the extras says so in one line instead of half-working.
    for command, extra in (("serve", "server"), ("train", "trainer"), ("demo", "server,trainer")):
        proc = subprocess.run(
            [str(bin_dir / "fovea"), command, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert proc.returncode == 1
        assert proc.stderr.strip().endswith(f"pip install 'fovea[{extra}]'"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
