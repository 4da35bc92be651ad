"""Write docs/configuration.md from the real `fovea` argument parsers, so the reference cannot drift.

Usage: python scripts/gen_config_docs.py [--check]   (--check exits 1 when the file is stale)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("client", "server", "trainer")]
OUT = ROOT / "docs" / "configuration.md"
COMMANDS = ("train", "demo-data", "serve", "predict", "health", "metadata", "models", "rollout", "demo")


def _row(action: argparse.Action) -> str | None:
    if isinstance(action, argparse._HelpAction):
        return None
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest.upper()}`"
    help_text = (action.help or "").replace("%(default)s", str(action.default))
    help_text = " ".join(help_text.split()).replace("|", "\\|")
    return f"| {names} | {help_text} |"


def render() -> str:
    from fovea.cli import SUBCOMMANDS, build_parser

    parts = [
        "# Configuration reference",
        "",
        "Generated from the command-line parsers by `python scripts/gen_config_docs.py`; a test fails",
        "when it is stale. Every `fovea serve` flag can also be set with the `FOVEA_*` environment",
        "variable shown beside it; `fovea train` options can also come from a YAML or JSON `--config`",
        "file (flags win).",
    ]
    for command in COMMANDS:
        parser = build_parser(command)
        parts += [
            "",
            f"## `fovea {command}`",
            "",
            SUBCOMMANDS[command][1][0].upper() + SUBCOMMANDS[command][1][1:] + ".",
            "",
        ]
        parts += ["| option | meaning |", "| --- | --- |"]
        parts += [row for action in parser._actions if (row := _row(action))]
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(OUT.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
