"""Server settings: one dataclass, every field documented, read from flags and FOVEA_* variables.

Precedence: a command-line flag, else the FOVEA_<FIELD_NAME> environment variable, else the default.
The `help` of each field is its docstring and is what `fovea serve --help` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fovea.server import cpus

ENV_PREFIX = "FOVEA_"


def _setting(default: Any, help: str, *, flag_type: Any = None, choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"help": help, "type": flag_type, "choices": choices})


@dataclass(frozen=True)
class Settings:
    """Everything `fovea serve` can be told."""

    model_dir: str = _setting(
        "", "Base folder of published models (<name>/<version>/), any tf.io.gfile path."
    )
    model_name: str = _setting(
        "",
        "Serve --model-dir as the root of one model (its <version>/ folders) under this name, as "
        "KServe's storage initializer lays out /mnt/models. Empty: --model-dir holds <name>/<version>/.",
    )
    host: str = _setting("0.0.0.0", "Address the gRPC server binds to.")
    port: int = _setting(8500, "gRPC port; 0 picks a free one (the bound port is logged).")
    metrics_port: int = _setting(9090, "Prometheus /metrics HTTP port; 0 picks a free one, -1 turns it off.")
    metrics_host: str = _setting("", "Address the metrics server binds to; empty means the same as --host.")
    http_port: int = _setting(
        8080,
        "KServe v2 / Open Inference Protocol REST port (/v2/..., KServe's default 8080), on --host; "
        "0 picks a free one, -1 turns it off. gRPC clients of every protocol use --port.",
    )
    http_body_timeout: float = _setting(
        10.0,
        "Seconds a REST request's headers may take to arrive, and its body too, plus one second per MB "
        "of body (a minimum rate of 1 MB/s); past it the request is answered 408 and its connection "
        "closed. Idle keep-alive connections close after it as well. A body slower than 1 MB/s "
        "(counted from its headers) no longer counts against --max-concurrent-rpcs, so slow clients cannot "
        "hold the port.",
    )
    max_batch_size: int = _setting(32, "Most images in one model call.")
    batch_timeout_ms: float = _setting(
        0.0,
        "Longest a queued image waits for a full batch, counted from the first queued image (a fixed "
        "delay, as Triton's max_queue_delay). 0, the default, lets batches follow the load instead: "
        "see --batch-formation.",
    )
    batch_formation: str = _setting(
        "adaptive",
        "With --batch-timeout-ms 0, how batches form. adaptive: a batch starts as soon as the model is "
        "free, except that right after a batch it waits for the callers it just answered when they come "
        "back (a closed loop, learned from the timing of arrivals) and for images admitted and still "
        "being decoded, never longer than the wait the bigger batch pays for in throughput (learned "
        "compute times). A lone caller never waits, and traffic whose arrivals do not follow answers "
        "(an open loop) is not held. eager: start whatever is queued at once (Triton's max_queue_delay "
        "0; under steady closed-loop load batches then alternate in size).",
        choices=("adaptive", "eager"),
    )
    allowed_batch_sizes: tuple[int, ...] = _setting(
        (),
        "Comma-separated batch sizes the model is called with; a batch is padded up to the next one. "
        "Empty: any size (the default on CPU); on a GPU the default is powers of two up to "
        "--max-batch-size, because every new shape costs autotuning there.",
        flag_type="int_list",
    )
    xla: bool = _setting(
        True,
        "After warm-up, compile the image signature with XLA (tf.function(jit_compile=True)) for the "
        "batch sizes --allowed-batch-sizes lists, else the powers of two up to --max-batch-size, on a "
        "background thread while the plain signature serves; check each agrees with the plain one "
        "within 1e-4, and serve each size by whichever of the two is faster in the serving calls. A size "
        "in between runs plain or zero-padded to the next compiled size, whichever is faster. A version "
        "whose signature graph was compiled before in this process (a retrain of the same architecture, "
        "other weights) runs those programs with its own weights: it only checks them, in its warm-up, "
        "and serves compiled from its first request. Skipped without --warmup; --no-xla serves the "
        "signature as exported.",
    )
    max_in_flight_batches: int = _setting(
        1,
        "Batches computed at once per model version. 1 suits a CPU, where one batch already uses every "
        "core and requests queued meanwhile form the next, larger batch (measured in bench/); 2 can "
        "overlap host work with a GPU's compute.",
    )
    max_queue_size: int = _setting(
        256, "Most requests waiting per model version; beyond it requests are shed (RESOURCE_EXHAUSTED)."
    )
    max_queue_batches: float = _setting(
        3.0,
        "Most work ahead of a request per compute slot, in batches (those computing or formed ahead, then "
        "the rows queued or being decoded in full batches), that it is admitted "
        "behind when arrivals do not follow answers (an open loop); beyond it RESOURCE_EXHAUSTED at once, "
        "before decoding, so accepted requests wait a few batch times whatever the model's speed. A "
        "request that would finish past its deadline is refused too. A closed loop (callers that wait for "
        "their answer) and a request arriving at an idle model are never refused for time. 0 turns "
        "this bound off.",
    )
    max_queue_wait_ms: float = _setting(
        0.0,
        "An optional absolute cap: the longest expected wait ahead of a request that it is admitted "
        "with (learned compute times). 0, the default, sets none: the bound is --max-queue-batches, in "
        "the model's own batch times, and the caller's deadline.",
    )
    max_inflight_images: int = _setting(
        1024,
        "Most images one replica holds at once (being decoded, queued or computed); beyond it Predict is "
        "refused with RESOURCE_EXHAUSTED before anything is decoded.",
    )
    max_inflight_mb: int = _setting(
        512,
        "Most encoded and raw image bytes (MiB) one replica holds at once; beyond it Predict is refused "
        "with RESOURCE_EXHAUSTED before anything is decoded.",
    )
    max_concurrent_rpcs: int = _setting(
        64,
        "RPCs handled at once, all services together; beyond it gRPC itself refuses new calls with "
        "RESOURCE_EXHAUSTED. The v2 REST port allows as many requests with a body at once (429 beyond; "
        "bodies arriving slower than 1 MB/s do not count, see --http-body-timeout). "
        "With --max-message-mb it bounds the memory of received messages (docs/memory.md).",
    )
    preprocess_threads: int = _setting(
        0,
        "Threads that decode and resize images beside model compute; 0 means the CPUs this process may "
        "use (its affinity mask, capped by the cgroup CPU quota).",
    )
    poll_interval: float = _setting(5.0, "Seconds between scans of --model-dir for new versions.")
    retire_after_scans: int = _setting(
        12,
        "A loaded version that a readable listing of --model-dir no longer shows keeps serving until "
        "this many scans in a row, over at least as many --poll-interval periods since it was last "
        "seen (one minute by default), have missed it; then it is retired. A scan that fails "
        "(I/O or permission error) or finds no version at all (the volume unmounted, unreadable or "
        "emptied) never retires anything. 1 retires at the first scan that misses it.",
    )
    wait_for_model_dir: bool = _setting(
        True,
        "When --model-dir does not exist or holds no complete version, keep serving health (NOT_SERVING) "
        "and wait for one to appear, as a Kubernetes pod whose volume is filled later should; the log says "
        "why once, then again only when that changes or every 10 minutes. --no-wait-for-model-dir exits "
        "with that reason at start instead.",
    )
    version_policy: str = _setting(
        "latest",
        "Which versions to serve: 'latest', 'all', or a comma-separated list of version numbers.",
    )
    grace_period: float = _setting(
        20.0, "Seconds SIGTERM/SIGINT waits for queued and in-flight requests before exiting."
    )
    max_images_per_request: int = _setting(256, "Most images one PredictRequest may carry.")
    max_pixels: int = _setting(
        40_000_000,
        "Most pixels (height x width, times frames for GIF) one image may have; checked from the "
        "encoded header before decoding, so a decompression bomb is refused cheaply.",
    )
    max_message_mb: int = _setting(64, "gRPC send and receive message limit in MiB.")
    keepalive_time_s: float = _setting(30.0, "Seconds between HTTP/2 keepalive pings to idle clients.")
    keepalive_timeout_s: float = _setting(10.0, "Seconds to wait for a keepalive ack before closing.")
    max_connection_age_s: float = _setting(
        300.0,
        "Close connections after this many seconds (with a grace), so clients reconnect and a "
        "Kubernetes Service rebalances them; 0 turns it off.",
    )
    max_connection_age_grace_s: float = _setting(30.0, "Seconds an aged-out connection may finish its calls.")
    gpu_memory_limit_mb: int = _setting(0, "Cap on GPU memory in MiB; 0 means memory growth, no cap.")
    tls_cert: str = _setting("", "PEM server certificate chain; with --tls-key turns TLS on.")
    tls_key: str = _setting("", "PEM private key of --tls-cert.")
    tls_client_ca: str = _setting(
        "", "PEM CA bundle; when set, clients must present a cert it signed (mTLS)."
    )
    warmup: bool = _setting(True, "Run every batch size once before a version serves (ready means warm).")
    reflection: bool = _setting(True, "Serve gRPC server reflection.")
    log_format: str = _setting("text", "Log format.", choices=("text", "json"))
    log_level: str = _setting("INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1:
            problems.append("--max-batch-size must be at least 1")
        if "/" in self.model_name or self.model_name.startswith("."):
            problems.append("--model-name must be a folder-like name: no '/', not starting with '.'")
        if any(b < 1 for b in self.allowed_batch_sizes):
            problems.append("--allowed-batch-sizes must be positive")
        if self.allowed_batch_sizes and max(self.allowed_batch_sizes) < self.max_batch_size:
            problems.append("the largest --allowed-batch-sizes must be at least --max-batch-size")
        if self.max_in_flight_batches < 1:
            problems.append("--max-in-flight-batches must be at least 1")
        if self.max_queue_size < 1:
            problems.append("--max-queue-size must be at least 1")
        if self.max_queue_wait_ms < 0:
            problems.append("--max-queue-wait-ms must not be negative")
        if self.max_inflight_images < 1 or self.max_inflight_mb < 1 or self.max_concurrent_rpcs < 1:
            problems.append(
                "--max-inflight-images, --max-inflight-mb and --max-concurrent-rpcs must be positive"
            )
        if self.batch_timeout_ms < 0:
            problems.append("--batch-timeout-ms must not be negative")
        if self.batch_formation not in ("adaptive", "eager"):
            problems.append("--batch-formation must be adaptive or eager")
        if self.max_queue_batches < 0:
            problems.append("--max-queue-batches must not be negative")
        if not 0 < self.http_body_timeout < float("inf"):
            problems.append("--http-body-timeout must be a positive number of seconds")
        if self.poll_interval <= 0:
            problems.append("--poll-interval must be positive")
        if self.retire_after_scans < 1:
            problems.append("--retire-after-scans must be at least 1")
        if self.max_images_per_request < 1 or self.max_pixels < 1 or self.max_message_mb < 1:
            problems.append("--max-images-per-request, --max-pixels and --max-message-mb must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("--tls-client-ca needs --tls-cert and --tls-key")
        try:
            self.specific_versions()
        except ValueError:
            problems.append("--version-policy must be 'latest', 'all' or comma-separated positive integers")
        if problems:
            raise ValueError("; ".join(problems))

    def retire_grace_s(self) -> float:
        """Least time a loaded version stays missing from storage before it is retired."""
        return self.retire_after_scans * self.poll_interval

    def batcher_options(self) -> dict[str, Any]:
        """The keyword arguments of each version's `Batcher` (the simulator builds its batchers from
        them too, so it measures the defaults the server runs)."""
        return {
            "max_batch_size": self.max_batch_size,
            "batch_timeout_s": self.batch_timeout_ms / 1000.0,
            "formation": self.batch_formation,
            "allowed_batch_sizes": self.allowed_batch_sizes,
            "max_in_flight": self.max_in_flight_batches,
            "max_queue_size": self.max_queue_size,
            "max_queue_wait_s": self.max_queue_wait_ms / 1000.0,
            "max_queue_batches": self.max_queue_batches,
        }

    def decode_threads(self) -> int:
        """Threads of the decode/resize pool: --preprocess-threads, else the CPUs this process may use."""
        return self.preprocess_threads or cpus.usable_cpus()

    def specific_versions(self) -> tuple[int, ...] | None:
        """The versions a specific policy names, or None for 'latest'/'all'."""
        if self.version_policy in ("latest", "all"):
            return None
        versions = tuple(int(v) for v in self.version_policy.split(",") if v.strip())
        if not versions or any(v < 1 for v in versions):
            raise ValueError(self.version_policy)
        return versions


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parse_value(f: dataclasses.Field, raw: str) -> Any:
    kind = f.metadata.get("type") or f.type
    if kind == "int_list":
        return tuple(int(v) for v in raw.replace(" ", "").split(",") if v)
    if f.type == "bool":
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return {"int": int, "float": float, "str": str}[f.type](raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults come from FOVEA_* variables when set (read at parse time)."""
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = env_name(f.name)
        default_text = f.default
        if f.type == "tuple[int, ...]":
            default_text = ",".join(map(str, f.default)) or "(none)"
        help_text = f"{f.metadata['help']} [env {env}; default {default_text}]".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.name == "model_dir":
            kwargs["metavar"] = "MODELS_DIR"
        parser.add_argument(flag, type=str, **kwargs)


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags, then the environment, then defaults; ValueError on a bad value."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = getattr(args, f.name, None)
        source = "--" + f.name.replace("_", "-")
        if raw is None and env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], env_name(f.name)
        if raw is None:
            continue
        if isinstance(raw, bool):
            values[f.name] = raw
            continue
        try:
            values[f.name] = _parse_value(f, raw)
        except (ValueError, KeyError):
            raise ValueError(f"{source}: cannot read {raw!r} as {f.type}") from None
    return Settings(**values)
