"""Shared test helpers: the environment for running fovea in a subprocess from this source tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ plus PYTHONPATH on this tree's client/server/trainer and a quiet TensorFlow."""
    env = dict(os.environ)
    paths = [str(ROOT / part) for part in ("client", "server", "trainer")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.update(extra)
    return env


@pytest.fixture
def fovea_env() -> dict[str, str]:
    """The environment for `[sys.executable, "-m", "fovea.cli", ...]` subprocesses."""
    return subprocess_env()
