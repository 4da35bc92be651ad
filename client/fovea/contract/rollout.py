"""The rollout file, `<models>/<name>/rollout.json`: labels, traffic shares and a shadow, one schema.

The server polls it beside the versions, `fovea rollout` writes it; both validate it here, so the
two can never disagree on what a valid file is. No TensorFlow, no server imports.

    {"labels": {"stable": 3, "canary": 4},      label -> version (a positive integer)
     "traffic": {"stable": 90, "canary": 10},   label -> share, non-negative, at least one positive
     "shadow": {"version": 4, "share": 0.2}}    optional: a version and the share of live requests it mirrors

Requests that name no version and no label are routed by `traffic`; with no traffic they go to the
newest loaded version, as without a file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

ROLLOUT_FILE = "rollout.json"
ROUTE_KEY_HEADER = "x-fovea-route-key"  # request metadata / HTTP header: a sticky routing key
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class RolloutError(ValueError):
    """A rollout file or a change to it that does not validate; the message says which field."""


@dataclass(frozen=True)
class Shadow:
    version: int
    share: float  # 0 < share <= 1: the fraction of live requests also computed on `version`


@dataclass(frozen=True)
class Rollout:
    labels: dict[str, int] = field(default_factory=dict)
    traffic: dict[str, float] = field(default_factory=dict)
    shadow: Shadow | None = None

    def pinned_versions(self) -> set[int]:
        """The versions this file names: kept loaded whatever the version policy says."""
        pinned = set(self.labels.values())
        if self.shadow is not None:
            pinned.add(self.shadow.version)
        return pinned

    def labels_of(self, version: int) -> list[str]:
        return sorted(label for label, v in self.labels.items() if v == version)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"labels": dict(sorted(self.labels.items()))}
        if self.traffic:
            out["traffic"] = {k: _number(v) for k, v in sorted(self.traffic.items())}
        if self.shadow is not None:
            out["shadow"] = {"version": self.shadow.version, "share": self.shadow.share}
        return out


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _version(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RolloutError(f"{where} is {value!r}; a version is a positive integer")
    return value


def validate(data: Any) -> Rollout:
    """The Rollout a parsed JSON document describes; RolloutError naming the first bad field."""
    if not isinstance(data, dict):
        raise RolloutError("the rollout file must hold a JSON object")
    unknown = sorted(set(data) - {"labels", "traffic", "shadow"})
    if unknown:
        raise RolloutError(f"unknown field {unknown[0]!r}; the fields are labels, traffic, shadow")
    labels_in = data.get("labels", {})
    if not isinstance(labels_in, dict):
        raise RolloutError("labels must be an object of label -> version")
    labels: dict[str, int] = {}
    for label, version in labels_in.items():
        if not _LABEL.match(label):
            raise RolloutError(
                f"label {label[:64]!r} is not a valid name: lowercase letters, digits, '-' or '_', starting "
                "with a letter (a number would be read as a version)"
            )
        labels[label] = _version(f"labels.{label}", version)
    traffic_in = data.get("traffic", {})
    if not isinstance(traffic_in, dict):
        raise RolloutError("traffic must be an object of label -> share")
    traffic: dict[str, float] = {}
    for label, share in traffic_in.items():
        if label not in labels:
            raise RolloutError(f"traffic names label {label[:64]!r}, which labels does not define")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < float("inf"):
            raise RolloutError(f"traffic.{label} is {share!r}; a share is a non-negative number")
        traffic[label] = float(share)
    if traffic and not any(traffic.values()):
        raise RolloutError("traffic shares are all 0; give at least one label a positive share")
    shadow = None
    shadow_in = data.get("shadow")
    if shadow_in is not None:
        if not isinstance(shadow_in, dict) or set(shadow_in) != {"version", "share"}:
            raise RolloutError('shadow must be {"version": N, "share": S}')
        share = shadow_in["share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise RolloutError(f"shadow.share is {share!r}; it must be in (0, 1]")
        shadow = Shadow(_version("shadow.version", shadow_in["version"]), float(share))
    return Rollout(labels, traffic, shadow)


def parse(text: str | bytes) -> Rollout:
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RolloutError(f"not valid JSON: {exc}") from None
    return validate(data)


def dumps(rollout: Rollout) -> str:
    return json.dumps(rollout.to_json(), indent=2) + "\n"


def write(model_dir: str, rollout: Rollout) -> str:
    """Validate and write `<model_dir>/rollout.json` atomically (a temporary file renamed over it)."""
    text = dumps(validate(rollout.to_json()))
    path = os.path.join(model_dir, ROLLOUT_FILE)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-rollout-", dir=model_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
