"""Cut a CRD's OpenAPI schema down to what one manifest uses, for an offline validation test.

Usage: python scripts/trim_crd_schema.py CRD.yaml VERSION MANIFEST.yaml [SOURCE-NOTE] > trimmed.json

KServe's InferenceService CRD is about 2 MB (every Pod field, inlined). The test needs only the
schema along the manifest's paths: at each object it keeps the type, `required`, every property's
name (so an unknown or misspelt field fails) and the full schema of only the properties used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

_KEEP = (
    "type",
    "required",
    "enum",
    "format",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
)


def trim(schema: dict[str, Any], value: Any) -> dict[str, Any]:
    out = {k: schema[k] for k in _KEEP if k in schema}
    if isinstance(value, dict) and "properties" in schema:
        out["known"] = sorted(schema["properties"])
        out["properties"] = {
            k: trim(schema["properties"][k], v) for k, v in value.items() if k in schema["properties"]
        }
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = {
            k: schema["additionalProperties"][k] for k in _KEEP if k in schema["additionalProperties"]
        }
    elif isinstance(value, list) and "items" in schema:
        merged: dict[str, Any] = {}
        for item in value:  # one items schema covering every element's keys
            part = trim(schema["items"], item)
            merged.update({k: v for k, v in part.items() if k != "properties"})
            merged.setdefault("properties", {}).update(part.get("properties", {}))
        if not merged.get("properties"):
            merged.pop("properties", None)
        out["items"] = merged or {k: schema["items"][k] for k in _KEEP if k in schema["items"]}
    return out


def main() -> int:
    crd_path, version, manifest_path = sys.argv[1:4]
    crd = yaml.safe_load(Path(crd_path).read_text())
    (spec,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    manifest = yaml.safe_load(Path(manifest_path).read_text())
    trimmed = trim(spec["schema"]["openAPIV3Schema"], manifest)
    trimmed["x-source"] = sys.argv[4] if len(sys.argv) > 4 else f"{crd['metadata']['name']} {version}"
    json.dump(trimmed, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
