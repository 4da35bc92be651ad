"""The peers side by side (optional; CI does not run it): PyTriton and MLServer serving the same
SavedModel signature with their own batchers at max batch 32, each alone on the machine, driven by
bench/loadgen.py over KServe v2 gRPC (raw `grpc_service_pb2` stubs from tritonclient).

    python bench/peers.py                      # ResNet50 at 96 px and the tiny CNN, both peers
    python bench/peers.py --servers pytriton --seconds 5

Each peer lives in its own venv (their pins clash with fovea's: MLServer needs protobuf < 7), created
on first use: /work/venv-pytriton and /work/venv-mlserver by default (--venvs to change). Writes
peers.json under --out (default bench/results/); bench/run.py folds it into summary.json, the table
and the plot of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path[:0] = [str(ROOT / d) for d in ("client", "server", "trainer")]
sys.path.insert(0, str(BENCH))
from run import make_models, make_payloads, run_loadgen  # noqa: E402  (run.py also puts devtools on the path)

MODEL_SIZES = {"resnet50": 96, "tiny": 32}  # bench/make_models.py's input sizes
PACKAGES = {
    "pytriton": ["nvidia-pytriton==0.7.0", "tensorflow==2.21.0"],
    "mlserver": ["mlserver==1.7.1", "tensorflow==2.21.0", "protobuf<7"],
}

# PyTriton: Triton's dynamic batcher with no queue delay (batches form from what waits meanwhile).
# argv: PORT plain|xla NAME=PATH...; "xla" serves `tf.function(jit_compile=True)` around the signature,
# compiled before the port opens for batch sizes 1, 2, 4, ... 32, a batch padded to the next of them
# (as fovea serves XLA): one compile per batch size the batcher can form would take minutes per size.
# A NAME ending in -encoded (fovea's KServe v2 name for encoded images) serves the version's bytes
# signature instead: BYTES image_bytes [N, 1] in, decoded and resized in the graph (the export
# contract's decode_and_resize, the ops fovea decodes with), always plain.
PYTRITON_SERVER = """
import sys
import numpy as np
import tensorflow as tf
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

port, kind, models = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
MAX_BATCH = 32
loaded_models = []  # a signature whose loaded object is collected loses its variables: keep them
triton = Triton(
    config=TritonConfig(grpc_port=port, http_port=port + 1, metrics_port=port + 2),
    # perf tools and raw stubs call endpoints PyTriton protects by default
    security_config=TritonSecurityConfig(restricted_endpoints=[]),
)
with triton:
    for spec in models:
        name, path = spec.split("=", 1)
        loaded = tf.saved_model.load(path)
        loaded_models.append(loaded)
        if name.endswith("-encoded"):
            fn = loaded.signatures["serving_bytes"]

            @batch
            def infer_bytes(image_bytes, fn=fn):
                flat = tf.constant(image_bytes.reshape(-1))
                return {"probabilities": fn(image_bytes=flat)["probabilities"].numpy()}

            triton.bind(
                model_name=name,
                infer_func=infer_bytes,
                inputs=[Tensor(name="image_bytes", dtype=np.bytes_, shape=(1,))],
                outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,))],
                config=ModelConfig(max_batch_size=MAX_BATCH, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
                strict=False,
            )
            continue
        fn = loaded.signatures["serving_default"]
        h, w = fn.structured_input_signature[1]["images"].shape[1:3]
        call = lambda images, fn=fn: fn(images=images)["probabilities"]
        sizes = [1 << i for i in range(MAX_BATCH.bit_length())]  # 1, 2, 4, ... MAX_BATCH
        if kind == "xla":
            call = tf.function(call, jit_compile=True)
            for size in sizes:
                call(tf.zeros([size, h, w, 3], tf.uint8))

        @batch
        def infer(images, call=call, sizes=sizes):
            n = len(images)
            if kind == "xla":  # pad to a compiled size, as fovea does: one compile per size, not per n
                size = next(s for s in sizes if s >= n)
                images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]), images.dtype)])
            return {"probabilities": call(tf.constant(images)).numpy()[:n]}

        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name="images", dtype=np.uint8, shape=(h, w, 3))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(max_batch_size=MAX_BATCH, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
            strict=False,
        )
    triton.serve()
"""

# MLServer: a custom runtime calling the signature, with MLServer's adaptive batching (2 ms).
MLSERVER_RUNTIME = """
import numpy as np
import tensorflow as tf
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class TFSignature(MLModel):
    async def load(self) -> bool:
        # the loaded object is kept: a signature whose object is collected loses its variables
        self._loaded = tf.saved_model.load(self.settings.parameters.uri)
        self._fn = self._loaded.signatures["serving_default"]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0]).astype(np.uint8)
        out = self._fn(images=tf.constant(images))["probabilities"].numpy()
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("probabilities", out)]
        )
"""


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ready_venv(venv: Path, packages: list[str]) -> Path | None:
    """The venv's python if ensure_venv has already made it with these packages, else None."""
    marker = venv / ".fovea-bench-ready"
    if marker.exists() and marker.read_text() == " ".join(packages):
        return venv / "bin" / "python"
    return None


def ensure_venv(venv: Path, packages: list[str]) -> Path:
    python = venv / "bin" / "python"
    marker = venv / ".fovea-bench-ready"
    if ready_venv(venv, packages):
        return python
    log(f"creating {venv} with {' '.join(packages)} (once; a few minutes)")
    base = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    marker.write_text(" ".join(packages))
    return python


def free_port() -> int:
    # The peers cannot report a port they bound themselves, so one is picked here (loopback only).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pytriton(
    python: Path, work: Path, models: dict[str, Path], xla: bool = False
) -> tuple[subprocess.Popen, int]:
    """PyTriton serving `models` (name → version folder): the signature as exported, or with `xla`
    XLA-compiled around it. Returns the process and its gRPC port."""
    script = work / "pytriton_server.py"
    script.write_text(PYTRITON_SERVER)
    port = free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # Triton's Python backend stub links against libpython: point it at this interpreter's.
    libdir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    kind = "xla" if xla else "plain"
    argv = [str(python), str(script), str(port), kind, *(f"{n}={p}" for n, p in models.items())]
    return _spawn(argv, env, work / f"pytriton-{kind}.log"), port


def start_mlserver(python: Path, work: Path, models: dict[str, Path]) -> tuple[subprocess.Popen, int]:
    """MLServer serving `models` with a runtime calling the signature; the process and its gRPC port."""
    folder = work / "mlserver"
    folder.mkdir(exist_ok=True)
    (folder / "tf_signature.py").write_text(MLSERVER_RUNTIME)
    port = free_port()
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "grpc_port": port,
                "http_port": free_port(),
                "metrics_port": free_port(),
                "parallel_workers": 0,  # inference in the server process, like the others
                "debug": False,
            }
        )
    )
    for name, path in models.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "implementation": "tf_signature.TFSignature",
                    "max_batch_size": 32,
                    "max_batch_time": 0.002,
                    "parameters": {"uri": str(path)},
                }
            )
        )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(folder))
    mlserver = python.parent / "mlserver"
    return _spawn([str(mlserver), "start", str(folder)], env, work / "mlserver.log"), port


def _spawn(argv: list[str], env: dict, logfile: Path) -> subprocess.Popen:
    with open(logfile, "w") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """End the server and everything it started (Triton runs its own binary and stubs)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def loadgen(target: str, model: str, payload: Path, concurrency: int, warmup: float, seconds: float) -> dict:
    """One closed-loop point over KServe v2 gRPC (what every server here speaks), retrying the first
    call while the server is still starting."""
    return run_loadgen(
        target, payload, "--protocol", "kserve", "--model", model, "--ready-timeout", "300",
        "--concurrency", str(concurrency), "--warmup", str(warmup), "--duration", str(seconds),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="pytriton,mlserver")
    parser.add_argument("--venvs", type=Path, default=Path("/work"), help="where venv-<server> live")
    parser.add_argument(
        "--models", type=Path, help="a models folder with resnet50/1 and tiny/1 (made if absent)"
    )
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fovea-peers-"))
    models = args.models
    if models is None:
        models = work / "models"
        log("exporting resnet50 and tiny with the trainer's export code")
        make_models(models, ["resnet50", "tiny"])
    payloads = {name: make_payloads(work, size)["uint8"] for name, size in MODEL_SIZES.items()}
    paths = {name: models / name / "1" for name in payloads}
    starters = {"pytriton": start_pytriton, "mlserver": start_mlserver}
    result: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "servers": {}}
    for server in args.servers.split(","):
        python = ensure_venv(args.venvs / f"venv-{server}", PACKAGES[server])
        log(f"{server}: starting")
        process, port = starters[server](python, work, paths)
        rows = []
        try:
            for c in (int(x) for x in args.concurrency.split(",")):
                r = loadgen(f"127.0.0.1:{port}", "resnet50", payloads["resnet50"], c, 3.0, args.seconds)
                log(f"{server} resnet50 c={c}: {r['throughput']:.1f} img/s, p50 {r['p50_ms']:.1f} ms")
                rows.append({"model": "resnet50", "level": c, **r})
            r = loadgen(f"127.0.0.1:{port}", "tiny", payloads["tiny"], 1, 2.0, min(args.seconds, 8.0))
            log(f"{server} tiny c=1: p50 {r['p50_ms']:.2f} ms")
            rows.append({"model": "tiny", "level": 1, **r})
        except subprocess.CalledProcessError as exc:
            log(f"{server} failed: {exc.stderr[-2000:]}\n(server log: {work / (server + '.log')})")
        finally:
            stop(process)
        result["servers"][server] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out / 'peers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
