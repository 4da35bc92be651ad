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


@pytest.fixture(scope="module")
def fovea(server):
    """A fovea client of the test module's own `server` fixture (a fovea server it started)."""
    from _serving import client

    with client(server.port) as c:
        yield c


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the must-show training first, as in a fresh process.

    TensorFlow derives each op's random seed from the global seed and a per-process counter, so every
    model an earlier test builds in this process shifts the training run's initialisation. Measured:
    0.975 test accuracy when it runs first (or alone), 0.85 once after the trainer tests. Running it
    first makes the suite's result the one a user gets from `fovea train`.
    """
    first = [item for item in items if item.path.name == "test_trainer_accuracy.py"]
    if first:
        items[:] = first + [item for item in items if item.path.name != "test_trainer_accuracy.py"]
