"""Shared test helpers: the environment for running fovea in a subprocess from this source tree."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """fovea.devtools' environment for a child that runs this tree's code (imported late: the devtools
    need the extras, and a test module that skips without them must still load)."""
    from fovea.devtools.environment import subprocess_env as env

    return env(**extra)


@pytest.fixture
def fovea_env() -> dict[str, str]:
    """The environment for `[sys.executable, "-m", "fovea.cli", ...]` subprocesses."""
    return subprocess_env()
