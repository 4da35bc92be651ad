"""The JSON form of a KServe v2 infer request: its text parsed and every field checked, without a transport.

v2_http.py calls `parse` on its parse thread for small bodies, and json_process.py calls it in the
parse process for large ones (json.loads holds the GIL for the whole parse, so a 16 MiB body would
stall the event loop for 0.4-0.7 s). So this module imports no aiohttp, grpc or TensorFlow: only
what a small child process needs. What `parse` returns is plain data, cheap to pickle: UINT8 tensors
packed into bytes, BYTES strings into one blob (`Strings`), repeated outputs as runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fovea.server.errors import InvalidArgument, clip

# Deeper JSON is refused before json.loads recurses into it (a UINT8 batch as nested lists is 7 deep).
MAX_JSON_DEPTH = 64

# A JSON string: quotes around anything but a quote or backslash, or an escape.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def json_depth(text: bytes) -> int:
    """The deepest nesting of brackets and braces outside strings (that of the JSON, if it is JSON),
    measured with regex and numpy before json.loads would recurse into it."""
    if b"[" not in text and b"{" not in text:
        return 0
    bare = _STRING.sub(b'""', text) if b'"' in text else text
    brackets = np.frombuffer(bare.translate(None, _NOT_BRACKETS), np.uint8)
    # "[" and "{" are 0x5B and 0x7B, "]" and "}" 0x5D and 0x7D: bit 1 is set in the opening ones.
    steps = (brackets & 2).astype(np.int32) - 1
    return int(np.cumsum(steps).max(initial=0))


class Strings(Sequence):
    """BYTES strings as one UTF-8 blob and their end offsets: a list of millions of short strings
    takes seconds to unpickle with the GIL held, this takes a copy. Reads back the same strings."""

    def __init__(self, values: Sequence[str]) -> None:
        # surrogatepass: a lone surrogate comes back as itself, for v2.py to refuse as it would the list.
        encoded = [v.encode("utf-8", "surrogatepass") for v in values]
        self._blob = b"".join(encoded)
        self._ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ends = self._ends
        end = int(ends[i])
        start = int(ends[i - 1]) if (i % len(ends)) else 0
        return self._blob[start:end].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        start = 0
        for end in self._ends.tolist():
            yield self._blob[start:end].decode("utf-8", "surrogatepass")
            start = end


@dataclass
class JsonTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None  # UINT8 data, packed
    values: Sequence[Any] | None = None  # BYTES strings; other datatypes as sent (v2.py refuses them)
    binary: tuple[int, int] | None = None  # (offset, size) of its bytes in the binary part of the body


@dataclass
class JsonInfer:
    inputs: list[JsonTensor]
    # (name, classification, how many times in a row): 300,000 repeated outputs are one run, not
    # 300,000 objects to pickle and build (v2.py refuses more than one output anyway, and says how many).
    outputs: list[tuple[str, int, int]] = field(default_factory=list)
    binary_names: set[str] = field(default_factory=set)  # outputs asked for as binary
    binary_output: bool = False  # parameters.binary_data_output, and no outputs named
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def packed(self) -> JsonInfer:
        """The same request with its large value lists in forms that pickle fast (for the parse process)."""
        for t in self.inputs:
            if t.values is None or isinstance(t.values, Strings):
                continue
            if t.datatype == "BYTES":
                t.values = Strings(t.values)
            else:
                array = np.asarray(t.values) if all(type(v) in (int, float) for v in t.values) else None
                if array is not None and array.dtype.kind in "if":
                    t.values = array
        return self


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def json_body(data: bytes) -> dict[str, Any]:
    """A JSON object, nested at most MAX_JSON_DEPTH deep, or InvalidArgument."""
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise InvalidArgument(
            f"the request's JSON is nested {depth} deep; at most {MAX_JSON_DEPTH} levels are parsed "
            "(a batch of images as nested lists is 7)"
        )
    try:
        # NaN and Infinity are Python's extensions, not JSON: refused here, not met as a tensor value.
        parsed = json.loads(data.decode("utf-8"), parse_constant=_no_constant) if data else {}
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return parsed


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {_kind(value)}")
    return value


def _string(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """A JSON value's type, as a caller would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {clip(value, 24, quote=False)}"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        if list not in set(map(type, data)):
            return data  # flat already (a C loop to find out, not a Python one per element)
        out: list = []
        for item in data:
            out.extend(_flatten(item) if isinstance(item, list) else [item])
        return out
    return [data]


def _values(tensor: JsonTensor, data: Any, what: str) -> None:
    """A JSON tensor's `data`, checked element by element for its datatype (before anything is sized
    by them): UINT8 integers 0..255 are packed into bytes at once (the list of Python ints takes 8-40x
    the body's size), BYTES elements must be strings."""
    values = _flatten(data)
    if tensor.datatype == "UINT8":
        # C loops first: a valid 16 MiB tensor is checked in a fraction of a second.
        if values and set(map(type, values)) == {int} and min(values) >= 0 and max(values) <= 255:
            tensor.raw = np.asarray(values, dtype=np.uint8).tobytes()
            return
        for i, v in enumerate(values):  # which element is wrong, for the message
            if type(v) is not int or not 0 <= v <= 255:
                raise InvalidArgument(
                    f"{what}.data[{i}] is {_kind(v)}; UINT8 data must be integers 0..255 (row-major, flat or nested)"
                )
        tensor.raw = np.asarray(values, dtype=np.uint8).tobytes() if values else b""
    elif tensor.datatype == "BYTES":
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise InvalidArgument(f"{what}.data[{i}] is {_kind(v)}; BYTES data must be strings")
        tensor.values = values
    else:
        tensor.values = values  # v2.py refuses the datatype with what the model expects


def parse(header: bytes, binary_size: int) -> JsonInfer:
    """The request a JSON header holds, `binary_size` bytes of binary tensors following it. Every
    field's type is checked here, so what reaches v2.py is what its rules expect."""
    body = json_body(header)
    parameters = _object(body.get("parameters"), "parameters")
    inputs, at = [], 0
    items = body.get("inputs")
    if items is not None and not isinstance(items, list):
        raise InvalidArgument(f"inputs must be an array of tensors, not {_kind(items)}")
    for i, item in enumerate(items or ()):
        what = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{what} must be an object with name, datatype, shape and data")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise InvalidArgument(f"{what}.shape must be an array of integers, not {_kind(shape)}")
        tensor = JsonTensor(
            _string(item.get("name"), f"{what}.name"),
            _string(item.get("datatype"), f"{what}.datatype"),
            tuple(shape),
        )
        size = _object(item.get("parameters"), f"{what}.parameters").get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or at + size > binary_size:
                raise InvalidArgument(
                    f"{what}.parameters.binary_data_size is {clip(size, 24)}, but {binary_size - at} binary "
                    "bytes remain"
                )
            tensor.binary = (at, size)
            at += size
        else:
            _values(tensor, item.get("data", []), what)
        inputs.append(tensor)
    outputs: list[tuple[str, int, int]] = []
    binary_names: set[str] = set()
    items = body.get("outputs")
    if items is not None and not isinstance(items, list):
        raise InvalidArgument(f"outputs must be an array of objects with a name, not {_kind(items)}")
    for i, item in enumerate(items or ()):
        if not isinstance(item, dict):
            raise InvalidArgument(f"outputs[{i}] must be an object with a name")
        params = _object(item.get("parameters"), f"outputs[{i}].parameters")
        k = params.get("classification", 0)
        if type(k) is not int:
            raise InvalidArgument(
                f"outputs[{i}].parameters.classification must be an integer, not {_kind(k)}"
            )
        name = _string(item.get("name"), f"outputs[{i}].name")
        if outputs and outputs[-1][:2] == (name, k):
            outputs[-1] = (name, k, outputs[-1][2] + 1)
        else:
            outputs.append((name, k, 1))
        if params.get("binary_data"):
            binary_names.add(name)
    return JsonInfer(
        inputs=inputs,
        outputs=outputs,
        binary_names=binary_names,
        binary_output=not outputs and bool(parameters.get("binary_data_output")),
        id=_string(body.get("id"), "id"),
        parameters=parameters,
    )
