"""`fovea rollout MODELS/NAME`: show or change a model's rollout.json (labels, traffic, shadow).

Without changes it prints the file and, from a running server's /metrics, each version's predictions
and the shadow's agreement with the live answers. With --label/--traffic/--shadow/--promote it
validates the new file (fovea.contract.rollout, the schema the server applies) and writes it
atomically; servers pick it up at their next poll. Imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import re
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import replace

from fovea import contract
from fovea.cli import CLIError
from fovea.contract import rollout as rf

DEFAULT_METRICS = "http://localhost:9090/metrics"


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", metavar="MODELS/NAME", help="the model's folder (its versions and rollout.json)"
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="LABEL=VERSION",
        help="point a label at a published version (repeatable); LABEL= removes the label",
    )
    parser.add_argument(
        "--traffic",
        metavar="LABEL=SHARE,...",
        help="traffic shares of requests naming no version, e.g. stable=90,canary=10 (replaces the shares)",
    )
    parser.add_argument(
        "--shadow",
        metavar="VERSION:SHARE",
        help="mirror SHARE (0..1] of live requests to VERSION after answering; 'off' removes the shadow",
    )
    parser.add_argument(
        "--promote",
        metavar="LABEL",
        help="move 'stable' to LABEL's version and give stable 100%% of the traffic",
    )
    parser.add_argument(
        "--metrics",
        default=os.environ.get("FOVEA_METRICS_URL", DEFAULT_METRICS),
        metavar="URL",
        help="a running server's /metrics to read the figures from (default: $FOVEA_METRICS_URL, else %(default)s)",
    )


def _current(model_dir: str) -> rf.Rollout:
    path = os.path.join(model_dir, rf.ROLLOUT_FILE)
    if not os.path.exists(path):
        return rf.Rollout()
    with open(path, "rb") as f:
        try:
            return rf.parse(f.read())
        except rf.RolloutError as exc:
            raise CLIError(f"{path} is invalid ({exc}); fix or remove it first") from None


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{what} {item!r} is not LABEL=VALUE")
        out.append((key.strip(), value.strip()))
    return out


def _int(text: str, what: str) -> int:
    if not text.isdigit():
        raise CLIError(f"{what} {text!r} is not a positive integer")
    return int(text)


def changed(current: rf.Rollout, args: argparse.Namespace, published: list[int]) -> rf.Rollout:
    """The rollout the flags ask for, validated, and checked against the published versions."""
    labels = dict(current.labels)
    traffic = dict(current.traffic)
    shadow = current.shadow
    for spec in args.label:
        for label, value in _pairs(spec, "--label"):
            if value == "":
                labels.pop(label, None)
                traffic.pop(label, None)
            else:
                labels[label] = _int(value, f"--label {label}=")
    if args.traffic is not None:
        traffic = {}
        for label, value in _pairs(args.traffic, "--traffic"):
            try:
                traffic[label] = float(value)
            except ValueError:
                raise CLIError(f"--traffic {label}={value!r}: a share is a number") from None
    if args.shadow is not None:
        if args.shadow == "off":
            shadow = None
        else:
            version, sep, share = args.shadow.partition(":")
            try:
                shadow = rf.Shadow(_int(version, "--shadow version"), float(share) if sep else 1.0)
            except ValueError:
                raise CLIError(f"--shadow {args.shadow!r} is not VERSION:SHARE") from None
    if args.promote:
        if args.promote not in labels:
            raise CLIError(
                f"--promote {args.promote}: no such label (labels: {', '.join(sorted(labels)) or 'none'})"
            )
        labels["stable"] = labels[args.promote]
        traffic = {"stable": 100.0}
    try:
        new = rf.validate(replace(rf.Rollout(labels, traffic, shadow)).to_json())
    except rf.RolloutError as exc:
        raise CLIError(f"the new rollout is invalid: {exc}") from None
    missing = sorted(v for v in new.pinned_versions() if v not in published)
    if missing:
        raise CLIError(
            f"version {missing[0]} is not published in {args.model_dir} (published: "
            f"{', '.join(map(str, published)) or 'none'})"
        )
    return new


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL_PAIR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def read_metrics(url: str, model: str, timeout: float = 5.0) -> dict[str, dict[tuple, float]]:
    """The rollout figures of `model` from a Prometheus text page: name -> {label values: value}."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8", "replace")
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or not m["name"].startswith(("fovea_version_", "fovea_shadow_")):
            continue
        labels = dict(_LABEL_PAIR.findall(m["labels"] or ""))
        if labels.pop("model", None) != model:
            continue
        out[m["name"]][tuple(sorted(labels.items()))] = float(m["value"])
    return out


def format_status(model: str, rollout: rf.Rollout, figures: dict[str, dict[tuple, float]] | None) -> str:
    lines = [f"model {model}"]
    if not rollout.labels:
        lines.append("  no rollout.json: requests naming no version go to the newest loaded version")
    for label, version in sorted(rollout.labels.items()):
        share = rollout.traffic.get(label)
        total = sum(rollout.traffic.values())
        shown = f"{100 * share / total:.1f}%" if share is not None and total else "-"
        lines.append(f"  label {label:<12} version {version:<5} traffic {shown}")
    if rollout.shadow:
        lines.append(
            f"  shadow version {rollout.shadow.version}, {100 * rollout.shadow.share:g}% of live requests"
        )
    if figures is None:
        return "\n".join(lines)
    predictions: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in figures.get("fovea_version_predictions_total", {}).items():
        k = dict(key)
        predictions[k["version"]][k["code"]] = predictions[k["version"]].get(k["code"], 0) + value
    for version, codes in sorted(predictions.items(), key=lambda kv: int(kv[0])):
        total = sum(codes.values())
        errors = total - codes.get("OK", 0)
        lines.append(
            f"  version {version}: {total:.0f} predictions, {errors:.0f} errors ({100 * errors / total:.2f}%)"
        )
    images = figures.get("fovea_shadow_images_total", {})
    for key, count in sorted(images.items()):
        version = dict(key)["version"]
        equal = figures.get("fovea_shadow_top1_equal_total", {}).get(key, 0.0)
        diff = figures.get("fovea_shadow_score_abs_diff_sum_total", {}).get(key, 0.0)
        outcomes = {
            dict(k)["outcome"]: v
            for k, v in figures.get("fovea_shadow_requests_total", {}).items()
            if dict(k)["version"] == version
        }
        agree = f"{100 * equal / count:.2f}%" if count else "-"
        mean = f"{diff / count:.4f}" if count else "-"
        dropped = sum(v for o, v in outcomes.items() if o != "computed")
        lines.append(
            f"  shadow version {version}: {count:.0f} images, top-1 agreement {agree}, mean |score diff| {mean}, "
            f"{outcomes.get('computed', 0):.0f} requests computed, {dropped:.0f} dropped"
        )
        pairs = [(dict(k), v) for k, v in figures.get("fovea_shadow_top1_pairs_total", {}).items()]
        for k, v in sorted(pairs, key=lambda kv: (kv[0]["live"], kv[0]["shadow"])):
            if k["version"] == version and k["live"] != k["shadow"]:
                lines.append(f"    live {k['live']} -> shadow {k['shadow']}: {v:.0f}")
    if not predictions and not images:
        lines.append("  the server reports no predictions for this model yet")
    return "\n".join(lines)


def run(command: str, args: argparse.Namespace) -> int:
    model_dir = args.model_dir.rstrip("/") or args.model_dir
    if not os.path.isdir(model_dir):
        raise CLIError(f"{model_dir} is not a folder; give a model's folder, MODELS/NAME")
    model = os.path.basename(os.path.abspath(model_dir))
    current = _current(model_dir)
    if args.label or args.traffic is not None or args.shadow is not None or args.promote:
        published = contract.local_published_versions(model_dir)
        new = changed(current, args, published)
        path = rf.write(model_dir, new)
        print(f"wrote {path}")
        print(format_status(model, new, None))
        return 0
    figures = None
    try:
        figures = read_metrics(args.metrics, model)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        print(format_status(model, current, None))
        print(f"  (no figures: {args.metrics} did not answer: {exc})")
        return 0
    print(format_status(model, current, figures))
    return 0
