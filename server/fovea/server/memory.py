"""The worst-case memory of one replica, as a formula of its settings (docs/memory.md explains it).

Every term is bounded by a setting, because the server admits or refuses work before it allocates:

    worst = warm + reload + messages + http + decoders + rows

- warm: RSS of the warm server with no traffic (runtime, model, activations of the largest batch,
  which warm-up ran). Measured, not computed: bench/ reports it.
- reload: a second copy of the model while a new version loads and warms beside the old one.
- messages: --max-concurrent-rpcs x --max-message-mb, twice (the received bytes and the parsed
  message); gRPC refuses calls beyond the first setting and messages beyond the second.
- http: the v2 REST port's bodies: --max-concurrent-rpcs counted ones (arriving at 1 MB/s or more, or
  in and being served; 429 beyond, before they are read) plus half as many held behind that rate (one
  more evicts the slowest), each at most --max-message-mb compressed or inflated (413 beyond); the one
  inflation at a time (its output beside its compressed body); and the one JSON parse at a time,
  in the parse process for JSON of SMALL_JSON or more (json_process.py): JSON_PARSE_FACTOR x the
  largest JSON part parsed (--max-message-mb / JSON_SHARE), which that process may keep as RSS, plus
  its interpreter (PARSE_PROCESS_BYTES), the JSON it was sent, the reply in the server (pickled and
  unpickled: 2 x REPLY_FACTOR x the JSON) and the parse thread's own parse of a JSON under SMALL_JSON.
  A UINT8 JSON tensor is packed into bytes once parsed.
- decoders: decode threads x --max-pixels x 9 bytes, the largest per-pixel footprint of any decoder
  (a progressive 4:4:4 JPEG: 3 bytes of RGB output plus 6 of DCT coefficients; imageinfo.py sizes
  every image this way before decoding and refuses what exceeds --max-pixels).
- rows: --max-inflight-images decoded rows (H x W x 3 bytes each), plus the stacked copy of each batch
  in flight.
No TensorFlow and no grpc here: the check of the shipped Kubernetes settings imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fovea.server.config import Settings

MIB = 2**20
DECODER_BYTES_PER_PIXEL = 9  # progressive 4:4:4 JPEG: 3 (RGB out) + 6 (2 bytes x 3 components)
# What json.loads and flattening make of a JSON tensor, per byte of its text: measured (tracemalloc)
# 13x for a flat list of digits, 28x for [[7],[7],...], 42-45x for lists nested 12 to 400 deep.
JSON_PARSE_FACTOR = 48
JSON_SHARE = 4  # the JSON part of a REST body may be at most 1/JSON_SHARE of --max-message-mb
SMALL_JSON = 256 * 1024  # JSON this large or more is parsed in the parse process (json_process.py)
# The parse process's interpreter with numpy: measured 28 MiB idle, 58 MiB after parsing 16 MiB of JSON
# (what it keeps of that parse beyond this is the JSON_PARSE_FACTOR term, which it may keep).
PARSE_PROCESS_BYTES = 64 * MIB
# What the parse process sends back, per character of JSON at most: a number of another datatype
# than UINT8 or BYTES ("7,": 2 characters) as a float64 or int64 (8 bytes). UINT8 is 1 byte per 2.
REPLY_FACTOR = 4


@dataclass(frozen=True)
class MemoryBudget:
    warm: int
    reload: int
    messages: int
    http: int
    decoders: int
    rows: int

    @property
    def total(self) -> int:
        return self.warm + self.reload + self.messages + self.http + self.decoders + self.rows

    def lines(self) -> list[str]:
        return [
            f"{name}: {value / MIB:,.0f} MiB"
            for name, value in (
                ("warm model", self.warm),
                ("second copy during a reload", self.reload),
                ("received messages", self.messages),
                ("REST bodies and the JSON parse", self.http),
                ("decoders at work", self.decoders),
                ("decoded rows and batches", self.rows),
                ("total", self.total),
            )
        ]


def budget(
    settings: Settings,
    warm_bytes: int,
    model_bytes: int,
    input_size: tuple[int, int] = (224, 224),
    decode_threads: int | None = None,
) -> MemoryBudget:
    """The worst case of one replica with these settings.

    `warm_bytes` is the measured RSS of the warm, idle server; `model_bytes` what one more loaded
    version adds (about the SavedModel's variables plus its graph); `input_size` the model's input.
    """
    h, w = input_size
    threads = decode_threads if decode_threads is not None else settings.decode_threads()
    row = h * w * 3
    return MemoryBudget(
        warm=warm_bytes,
        reload=model_bytes,
        messages=2 * settings.max_concurrent_rpcs * settings.max_message_mb * MIB,
        http=rest_bodies(settings.max_concurrent_rpcs) * settings.max_message_mb * MIB
        + settings.max_message_mb * MIB
        + json_parse_bytes(settings.max_message_mb * MIB // JSON_SHARE),
        decoders=threads * settings.max_pixels * DECODER_BYTES_PER_PIXEL,
        rows=settings.max_inflight_images * row
        + settings.max_in_flight_batches * settings.max_batch_size * row,
    )


def json_parse_bytes(max_json: int) -> int:
    """The one JSON parse at a time: in the parse process (its parse, interpreter and the JSON it
    was sent), its reply in the server (pickled, then unpickled), and the parse thread's small parse."""
    return (
        JSON_PARSE_FACTOR * max_json
        + PARSE_PROCESS_BYTES
        + max_json
        + 2 * REPLY_FACTOR * max_json
        + JSON_PARSE_FACTOR * SMALL_JSON
    )


def rest_bodies(max_concurrent_rpcs: int) -> int:
    """REST bodies held at once: the counted ones and the laggards beside them (http_body.Bodies)."""
    return max_concurrent_rpcs + max(1, max_concurrent_rpcs // 2)


def worst_case_bytes(settings: Settings, warm_bytes: int = 0, model_bytes: int = 0, **kw) -> int:
    return budget(settings, warm_bytes, model_bytes, **kw).total
