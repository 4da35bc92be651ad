"""The environment for a `python -m fovea.cli ...` subprocess that must run the code this process runs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# The parts of the `fovea` namespace; each may come from its own folder (a source tree) or one site-packages.
_PARTS = ("fovea.client", "fovea.server", "fovea.trainer", "fovea.devtools")


def source_roots() -> list[str]:
    """The folders that hold this process's `fovea/<part>/` packages, in import order, without repeats."""
    roots: list[str] = []
    for name in _PARTS:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        root = str(Path(spec.origin).resolve().parents[2])  # <root>/fovea/<part>/__init__.py
        if root not in roots:
            roots.append(root)
    return roots


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ with PYTHONPATH led by this process's fovea folders, a quiet TensorFlow (unless
    TF_CPP_MIN_LOG_LEVEL is set), unbuffered
    output, and no inherited TF_CONFIG (a stray cluster spec would turn a child into a worker); then
    `extra`."""
    env = dict(os.environ)
    paths = source_roots()
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env
