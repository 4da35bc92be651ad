"""The benchmark's shared outputs, written by more than one script: summary.json, whose keys each
script owns a share of, and docs/benchmarks.md, whose generated sections each script owns one of.

A script merges what it measured into these files and leaves the rest as it found it, so that
bench/run.py and bench/interleaved.py can be re-run in any order.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path


def merge_summary(path: Path, updates: dict) -> dict:
    """Write `updates` into the JSON object at `path`, keeping keys it does not name (dicts merge key by
    key, so a script that adds one figure under another script's key keeps the rest); the result."""
    current = json.loads(path.read_text()) if path.exists() else {}
    merged = _merge(current, updates)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def _merge(old: dict, new: dict) -> dict:
    out = dict(old)
    for key, value in new.items():
        out[key] = (
            _merge(old[key], value) if isinstance(value, dict) and isinstance(old.get(key), dict) else value
        )
    return out


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: generated, do not edit -->", f"<!-- /{name} -->"


def sections(text: str) -> dict[str, str]:
    """The generated sections of a document: name → the section with its markers."""
    found = re.finditer(r"<!-- ([\w-]+): generated, do not edit -->.*?<!-- /\1 -->", text, re.S)
    return {m.group(1): m.group(0) for m in found}


def put_section(text: str, name: str, body: str) -> str:
    """`text` with its section `name` replaced by `body`; a new section goes after the last generated
    one, or before the first second-level heading (after the document's introduction), or at the end."""
    start, end = _markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    found = sections(text)
    if name in found:
        return text.replace(found[name], block)
    if found:
        last = max(text.index(b) + len(b) for b in found.values())
        return text[:last] + "\n\n" + block + text[last:]
    heading = re.search(r"^## ", text, re.M)
    if heading is None:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    return text[: heading.start()] + block + "\n\n" + text[heading.start() :]


def keep_sections(old_text: str, new_text: str) -> str:
    """`new_text` (a whole document rewritten by one script) with the generated sections of `old_text`
    that it lacks put back, so another script's section survives the rewrite."""
    for name, block in sections(old_text).items():
        if name not in sections(new_text):
            new_text = put_section(new_text, name, block.split("\n", 1)[1].rsplit("\n", 1)[0])
    return new_text


def write_section(docs: Path, name: str, body: str) -> None:
    """Replace (or add) the section `name` of the document at `docs`, keeping everything else."""
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(put_section(text, name, body))


def machine() -> str:
    """The host in one line: cores, CPU, memory, OS, Python and the versions that matter for speed."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(
        next(
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    )
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("tensorflow", "grpcio", "protobuf"))
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_kb / 2**20:.0f} GiB, no GPU, {platform.platform()}, "
        f"Python {platform.python_version()}, {versions}"
    )
