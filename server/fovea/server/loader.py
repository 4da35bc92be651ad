"""The one server module that imports TensorFlow: devices, storage, SavedModel load, signature calls.

In TF Serving's words this is the loader: it turns one version folder into a warm, callable model.
The rest of the server sees numpy arrays and plain Python. Preprocessing uses exactly the ops of the
export contract's `decode_and_resize` (decode_image with channels=3 and expand_animations=False,
bilinear resize, round, clip, cast to uint8), so the server's pixels equal the bytes signature's.

With `xla_sizes`, warm-up also starts compiling the image signature with XLA
(`tf.function(jit_compile=True)`) for each of those batch sizes, on a background thread: compiling
ResNet50 for six sizes takes longer than the rest of a cold start, and the plain signature is warm
and serves meanwhile. Each compiled size is checked against the plain signature (within 1e-4) and
both are timed; from then on each compiled size is served by whichever of the two is faster in the
calls that serve traffic (`batch_costs.FasterOf`: one call in 16 tries the other, so a choice made
on a quiet machine follows what the server does under load). XLA
compiles per input shape, so only those sizes can be compiled. Any other batch size n has the same
learned choice between the plain signature at n and the compiled one at the next compiled size,
zero-padded: on a CPU a batch of 3 padded to 4 and compiled took half the time of 3 plain, while a
batch of 17 padded to 32 may spend what XLA gains; the serving calls' times decide which.

The compiled program takes the weights as arguments (`XlaProgram`), so it is shared by every version
whose signature graph is the same: a retrained version of one architecture, the usual hot swap, runs
the executables its predecessor compiled with its own weights, checks them against its plain
signature in its warm-up, and starts from the times its predecessor learned while serving. Compiling
ResNet50 at 96 px for six sizes took 16 s of both cores here on a quiet host and about a minute beside
a serving version, which it slowed even at the lowest priority, in a thread or in a child process
(p99 1.7-1.9x quiet; bench/NOTES.md).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import tensorflow as tf
from fovea.contract import (
    INPUT_IMAGES,
    LABELS_FILE,
    METADATA_FILE,
    OUTPUT,
    SIGNATURE_IMAGES,
    ModelMetadata,
    parse_labels,
)
from fovea.server import cpus
from fovea.server.background import lower_thread_priority, unpaced
from fovea.server.batch_costs import FasterOf
from fovea.server.errors import ResourceExhausted

log = logging.getLogger(__name__)

T = TypeVar("T")

# How a background model call is run (background.ServingFirst.run, or at once): it returns call().
Pace = Callable[[Callable[[], T]], T]

XLA_TOLERANCE = 1e-4  # largest difference from the plain signature a compiled size may show
_TIMED_CALLS = 3  # calls per function and size when choosing between plain and compiled


def configure_device(gpu_memory_limit_mb: int = 0) -> str:
    """Use the GPU when there is one (memory growth, or a hard cap), else the CPU; say which."""
    allowed = cpus.usable_cpus()
    if allowed < cpus.affinity():
        # TF sizes its thread pools from the affinity mask; under a cgroup CPU quota smaller than
        # that, the extra threads only get throttled.
        try:
            tf.config.threading.set_intra_op_parallelism_threads(allowed)
            tf.config.threading.set_inter_op_parallelism_threads(allowed)
            log.info("TensorFlow thread pools sized to the CPU quota: %d", allowed)
        except RuntimeError:  # already initialised (a second server in one process)
            pass
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        log.info("no GPU found; serving on the CPU")
        _start_runtime()
        return "CPU"
    try:
        for gpu in gpus:
            if gpu_memory_limit_mb > 0:
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_limit_mb)]
                )
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # already initialised (a second server in one process)
        log.warning("could not configure GPU memory: %s", exc)
    log.info(
        "serving on %d GPU(s): %s%s",
        len(gpus),
        ", ".join(g.name for g in gpus),
        f" (memory limit {gpu_memory_limit_mb} MiB)" if gpu_memory_limit_mb > 0 else " (memory growth)",
    )
    _start_runtime()
    return "GPU"


def _start_runtime() -> None:
    """Start TensorFlow's runtime (its devices and their thread pools) on this thread, now.

    Threads inherit their creator's CPU priority, and the first load runs on the manager's loader
    thread, which lowers its own (background.py): the pools that serve every request must not be
    created there.
    """
    tf.constant(0).numpy()


class GFileStorage:
    """The `source.Storage` the server uses: tf.io.gfile, so the model folder may be any gfile path.

    Only "not found" means empty or absent. Any other error (EIO, ESTALE, permission, a network
    store timing out) raises: tf.io.gfile.isdir returns False on every error, and an empty listing
    read from a hiccup once retired every version of every replica at the same moment.
    """

    def listdir(self, path: str) -> list[str]:
        with _os_errors():
            try:
                return [n.rstrip("/") for n in tf.io.gfile.listdir(path)]
            except tf.errors.NotFoundError:
                return []

    def isdir(self, path: str) -> bool:
        with _os_errors():
            try:
                return tf.io.gfile.stat(path).is_directory
            except tf.errors.NotFoundError:
                return False

    def exists(self, path: str) -> bool:
        with _os_errors():
            return tf.io.gfile.exists(path)

    def read(self, path: str) -> bytes | None:
        """A small file's bytes; None when it does not exist (other errors raise)."""
        with _os_errors():
            try:
                with tf.io.gfile.GFile(path, "rb") as f:
                    return f.read()
            except tf.errors.NotFoundError:
                return None


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """TF's storage errors as OSError, as source.Storage promises, so the manager tells a permission
    error from an I/O error without importing TensorFlow."""
    try:
        yield
    except tf.errors.PermissionDeniedError as exc:
        raise PermissionError(errno.EACCES, exc.message) from exc
    except tf.errors.OpError as exc:
        raise OSError(errno.EIO, exc.message) from exc


def read_metadata(path: str, name: str, version: int) -> ModelMetadata:
    """fovea.json of a version folder; without one (or without labels in it), labels.txt gives the labels."""
    meta_path = posixpath.join(path, METADATA_FILE)
    if tf.io.gfile.exists(meta_path):
        with tf.io.gfile.GFile(meta_path) as f:
            meta = ModelMetadata.from_json(f.read(), name=name, version=version)
    else:
        meta = ModelMetadata(name=name, version=version, labels=[], input_height=0, input_width=0)
    if not meta.labels:
        with tf.io.gfile.GFile(posixpath.join(path, LABELS_FILE)) as f:
            meta.labels = parse_labels(f.read())
    return meta


class LoadedModel:
    """One loaded SavedModel version: batched inference plus the per-image preprocessing it needs.

    It satisfies `servable.Model`; `load` is the factory the manager calls on its loader thread.
    """

    def __init__(self, path: str, name: str, version: int, *, xla_sizes: Sequence[int] = ()) -> None:
        self.metadata = read_metadata(path, name, version)
        self.xla_sizes = sorted(set(xla_sizes))
        self.warmup_seconds: dict[int, float] = {}  # batch size -> seconds, timed by warm_up
        # Batch size -> the XLA-compiled signature (every compiled size), and for those that agree
        # with the plain signature, which of the two serves faster (learned while serving).
        self._built: dict[int, Callable[[tf.Tensor], tf.Tensor]] = {}
        self._choices: dict[int, FasterOf] = {}
        # Batch sizes that were not compiled -> the compiled size they may be padded to (see predict).
        self._padded_to: dict[int, int] = {}
        self._compile_done = threading.Event()
        self._pace: Pace = unpaced  # how warm-up and the XLA checks run their model calls
        # Batch size -> (plain seconds, compiled seconds) as timed at warm-up.
        self.xla_timings: dict[int, tuple[float, float]] = {}
        self._program: XlaProgram | None = None  # the compiled program, shared by versions of one graph
        self._loaded = tf.saved_model.load(path)
        # The concrete signature function: it never retraces, unlike the restored Keras object.
        self._signature = self._loaded.signatures[SIGNATURE_IMAGES]
        spec = self._signature.structured_input_signature[1][INPUT_IMAGES]
        height, width = spec.shape[1], spec.shape[2]
        if not self.metadata.input_height:
            self.metadata.input_height, self.metadata.input_width = int(height), int(width)
        h, w = self.metadata.input_height, self.metadata.input_width
        signature = self._signature
        self._plain: Callable[[tf.Tensor], tf.Tensor] | None = _unbound(
            signature,
            lambda images: signature(**{INPUT_IMAGES: images})[OUTPUT],
            tf.zeros([1, h, w, 3], tf.uint8),
        )

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def decode(image_bytes: tf.Tensor) -> tf.Tensor:
            image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
            # Bilinear resizing to the size an image already has is the identity (half-pixel
            # centres at scale 1 sample each pixel exactly), so an image sent at the model's size
            # skips it: the same pixels as the bytes signature, without a quarter of the decode's
            # CPU (224 px JPEG, bench/host_path.py).
            shape = tf.shape(image)
            at_size = tf.logical_and(tf.equal(shape[0], h), tf.equal(shape[1], w))
            return tf.cond(at_size, lambda: image, lambda: _resize(image, h, w))

        @tf.function
        def resize(image: tf.Tensor) -> tf.Tensor:
            return _resize(image, h, w)

        self._decode = decode
        self._resize_uint8 = resize.get_concrete_function(tf.TensorSpec([None, None, 3], tf.uint8))
        self._resize_float = resize.get_concrete_function(tf.TensorSpec([None, None, 3], tf.float32))

    @property
    def num_classes(self) -> int:
        return len(self.metadata.labels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 probabilities [N, classes]."""
        n = len(images)
        with _out_of_memory(f"computing a batch of {n}"):
            choice = self._choices.get(n)
            if choice is None:
                return self.predict_plain(images)
            way = choice.pick()
            start = time.perf_counter()
            if way == 0:
                out = self.predict_plain(images)
            else:
                padded = self._padded_to.get(n, n)
                if padded == n:
                    out = self.predict_compiled(images)
                else:
                    batch = np.zeros((padded, *images.shape[1:]), images.dtype)
                    batch[:n] = images
                    out = self.predict_compiled(batch)[:n]
            choice.record(way, time.perf_counter() - start)
            return out

    def predict_plain(self, images: np.ndarray) -> np.ndarray:
        """The signature as exported, never compiled (the reference the compiled sizes must match)."""
        return self._plain(tf.constant(images)).numpy()  # type: ignore[misc]

    def predict_compiled(self, images: np.ndarray) -> np.ndarray:
        """The XLA-compiled signature for this batch size, served or not (KeyError if not built;
        see wait_compiled)."""
        return self._built[len(images)](tf.constant(images)).numpy()

    @property
    def compiled_sizes(self) -> list[int]:
        """Compiled batch sizes served XLA-compiled (now: the choice follows the serving calls' times)."""
        return sorted(
            size
            for size, choice in self._choices.items()
            if choice.preferred == 1 and size not in self._padded_to
        )

    @property
    def padded_sizes(self) -> dict[int, int]:
        """Batch sizes served compiled at a larger compiled size, zero-padded (now): size -> padded to."""
        return {
            size: padded for size, padded in self._padded_to.items() if self._choices[size].preferred == 1
        }

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> uint8 [H, W, 3] at the model's size; ValueError if they do not decode."""
        try:
            with _out_of_memory("decoding an image"):
                return self._decode(tf.constant(data)).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as exc:
            raise ValueError(str(exc).splitlines()[0] if str(exc) else "undecodable") from None

    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 or float32 [h, w, 3] (floats already clipped to 0..255) -> uint8 [H, W, 3]."""
        fn = self._resize_uint8 if image.dtype == np.uint8 else self._resize_float
        with _out_of_memory("resizing an image"):
            return fn(tf.constant(image)).numpy()

    def warm_up(self, batch_sizes: Sequence[int], pace: Pace = unpaced) -> None:
        """Run every batch size and every preprocessing path once, so the first request is not slow.

        Every model call, here and in the background XLA compile, goes through `pace`
        (background.ServingFirst during a hot reload), so the serving version keeps the cores first.
        """
        self._pace = pace
        program = programs.for_signature(self._signature) if self.xla_sizes else None
        if program is not None and program.shared(self.xla_sizes):
            # An earlier version of this graph compiled every size: the calls left only run it, so
            # they are made now, paced like the warm-up, and this version serves compiled from its
            # first request (one that starts plain is slower, and cold at sizes not warmed).
            self._compile_logged(program)
            program = None
        h, w = self.metadata.input_height, self.metadata.input_width
        for size in sorted({*batch_sizes, *self.xla_sizes}):
            if size in self.xla_timings:
                # Run compiled and plain, and checked, by the shared compile just now; its costs are
                # what the earlier version learned while serving.
                if size in batch_sizes:
                    self.warmup_seconds[size] = min(self._choices[size].seconds)
                continue
            batch = np.zeros((size, h, w, 3), np.uint8)
            out = pace(lambda batch=batch: self.predict(batch))
            if out.shape != (size, self.num_classes):
                raise ValueError(
                    f"signature returned shape {out.shape} for a batch of {size}; expected "
                    f"({size}, {self.num_classes}) from {self.num_classes} labels"
                )
            if size in batch_sizes:
                # Timed on a second call (the first one builds the graph): the batcher starts its
                # learned compute times from these, so admission and batching know the model's
                # costs from the first request.
                self.warmup_seconds[size] = pace(lambda batch=batch: _timed(self.predict, batch))
        if program is not None:
            threading.Thread(
                target=self._compile_in_background, args=(program,), name="fovea-xla", daemon=True
            ).start()
        elif not self.xla_sizes:
            self._compile_done.set()
        sample = np.full((3, 5, 3), 128, np.uint8)
        self.decode(tf.io.encode_png(sample).numpy())
        self.decode(tf.io.encode_jpeg(sample).numpy())
        self.resize(sample)
        self.resize(sample.astype(np.float32))

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until the background XLA compile (if any) has finished; False on timeout."""
        return self._compile_done.wait(timeout)

    def _compile_in_background(self, program: XlaProgram) -> None:
        # The compiler is CPU work of its own thread (and the threads it starts): lowest priority, so
        # a version being compiled during a hot reload leaves the cores to the one serving.
        lower_thread_priority()
        self._compile_logged(program)

    def _compile_logged(self, program: XlaProgram) -> None:
        try:
            self._compile(self.xla_sizes, program)
        except Exception as exc:
            if self._signature is None:
                return  # the version was released (a reload or shutdown) while it compiled
            # Serving goes on with the plain signature; a compile failure costs speed, not answers. A
            # model with ops XLA lacks is an expected case, so one line of TF's message (its first
            # telling line: TF often opens with "in user code:"), not a traceback that reads like a crash.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            telling = [line for line in lines if not line.startswith(("in user code", "File "))]
            reason = (telling or lines or [type(exc).__name__])[0][:300]
            log.warning(
                "%s version %d: XLA compile failed, serving the plain signature: %s",
                self.metadata.name,
                self.metadata.version,
                reason,
            )
        finally:
            self._compile_done.set()

    def _compile(self, batch_sizes: Sequence[int], program: XlaProgram) -> None:
        """Compile every size (two at a time: XLA's compiler is mostly one thread), or take the sizes
        an earlier version of the same graph compiled; then keep the compiled function for the sizes
        where it agrees with the plain signature, served by whichever of the two is faster."""
        h, w = self.metadata.input_height, self.metadata.input_width
        signature = self._signature
        self._program = program
        rng = np.random.default_rng(0)
        samples = {s: rng.integers(0, 256, size=(s, h, w, 3), dtype=np.uint8) for s in batch_sizes}
        shared = {size for size in batch_sizes if size in program.timings}

        def build(size: int) -> tuple[Callable, np.ndarray] | None:
            if self._signature is None:
                return None  # released meanwhile: compile nothing more for a retired version
            if size in shared:  # a run, not a compile: it waits for the serving versions' turn
                return self._pace(lambda: program.bind(size, signature, samples[size]))
            return program.bind(size, signature, samples[size])

        start = time.perf_counter()
        if shared == set(batch_sizes):
            built = {size: build(size) for size in batch_sizes}
        else:
            with concurrent.futures.ThreadPoolExecutor(
                2, thread_name_prefix="fovea-xla", initializer=lower_thread_priority
            ) as pool:
                built = dict(zip(batch_sizes, pool.map(build, batch_sizes), strict=True))
        compile_s = time.perf_counter() - start
        if self._signature is None:
            return  # released meanwhile (a size may not have been built)
        for size, (fn, got) in built.items():
            if self._signature is None:
                return  # released meanwhile
            self._built[size] = fn
            images = samples[size]
            want = self._pace(lambda images=images: self.predict_plain(images))
            difference = float(np.max(np.abs(got - want)))
            if difference > XLA_TOLERANCE:
                log.warning(
                    "XLA: batch %d differs from the signature by %.2g; serving it plain", size, difference
                )
                continue
            # The times an earlier version of this graph learned while serving, else timed now: the
            # timing calls hold both cores for a batch each, beside the serving version.
            timed = program.timings.get(size) if size in shared else None
            if timed is None:
                timed = _best_times(self.predict_plain, self.predict_compiled, images, self._pace)
                program.timings[size] = timed
            self.xla_timings[size] = timed
            self._choices[size] = FasterOf(*timed)
        self._choose_padding()
        log.info(
            "%s version %d: XLA: compiled %d sizes in %.1fs%s; serving %s compiled (%s)",
            self.metadata.name,
            self.metadata.version,
            len(built),
            compile_s,
            f" ({len(shared)} of them by an earlier version of the same graph)" if shared else "",
            self.compiled_sizes or "none",
            ", ".join(
                f"{size}: {plain * 1000:.1f} ms plain, {xla * 1000:.1f} ms compiled"
                for size, (plain, xla) in sorted(self.xla_timings.items())
            ),
        )

    def _choose_padding(self) -> None:
        """Give every size between the compiled ones a choice: plain as it comes, or compiled at the
        next compiled size. Its plain time starts as the line between the neighbouring compiled
        sizes' plain times (through 0 below the smallest), its padded time as the larger size's
        compiled time; the serving calls correct both."""
        sizes = sorted(self.xla_timings)
        if not sizes:
            return
        choices: dict[int, FasterOf] = {}
        padded_to: dict[int, int] = {}
        lower, lower_plain = 0, 0.0
        for size in sizes:
            plain_s, compiled_s = self.xla_timings[size]
            for n in range(lower + 1, size):
                estimate = lower_plain + (plain_s - lower_plain) * (n - lower) / (size - lower)
                choices[n] = FasterOf(estimate, compiled_s)
                padded_to[n] = size
            lower, lower_plain = size, plain_s
        # Published in one assignment each, padding first: `predict` on a serving thread reads them.
        self._padded_to = {**self._padded_to, **padded_to}
        self._choices = {**choices, **self._choices}

    def release(self) -> None:
        if self._program is not None:
            # What this version learned while serving is the next version's start (same graph).
            self._program.learned({n: self._choices[n].seconds for n in self.xla_timings})
        self._choices, self._built, self._padded_to = {}, {}, {}
        self._program = None
        self._signature = self._plain = None
        self._loaded = None


class XlaProgram:
    """The image signature XLA-compiled per batch size, with the weights as arguments.

    Nothing of one version is captured: each call passes the calling version's variables, so every
    version whose signature graph is the same (`Programs`) runs the executables compiled once.
    """

    def __init__(self) -> None:
        # The signature traced for a new size: the asking version's, set only while it traces (the
        # program must not keep a version alive: a signature holds its variables).
        self._tracing: tf.types.experimental.ConcreteFunction | None = None

        @tf.function(jit_compile=True)
        def compiled(images: tf.Tensor, weights: list[tf.Tensor]) -> tf.Tensor:
            # The signature's graph called with these variables in place of its own captured ones,
            # through TensorFlow's flat call (as `_unbound`): without it (another TF version) this
            # raises, and the compile thread logs that it serves the plain signature.
            out = self._tracing._call_flat([images], weights)  # type: ignore[union-attr]
            return out[OUTPUT] if isinstance(out, dict) else out

        self._function = compiled
        self._sizes: dict[int, tf.types.experimental.ConcreteFunction] = {}
        self._flat: dict[int, bool] = {}  # size -> whether its flat call answered as the public one
        self._lock = threading.Lock()
        # Batch size -> (plain, compiled) seconds, for the sizes compiled and checked: timed by the
        # first version, then what the last version released had learned while serving; the next
        # version's FasterOf starts there.
        self.timings: dict[int, tuple[float, float]] = {}

    def shared(self, sizes: Sequence[int]) -> bool:
        """Whether an earlier version compiled and checked every one of these sizes."""
        return all(size in self.timings for size in sizes)

    def bind(
        self, size: int, signature: tf.types.experimental.ConcreteFunction, sample: np.ndarray
    ) -> tuple[Callable[[tf.Tensor], tf.Tensor], np.ndarray]:
        """This version's call of the compiled size (its own variables bound), and its answer for
        `sample`. The first call of a size compiles it, once in this process."""
        with self._lock:  # traced once per size, though two versions may ask at the same time
            fn = self._sizes.get(size)
            if fn is None:
                self._tracing = signature
                try:
                    fn = self._function.get_concrete_function(
                        tf.TensorSpec(sample.shape, tf.uint8), list(signature.captured_inputs)
                    )
                finally:
                    self._tracing = None
                self._sizes[size] = fn
        weights = list(signature.captured_inputs)

        def public(images: tf.Tensor) -> tf.Tensor:
            return fn(images, weights)

        flat = self._flat.get(size)
        if flat is None:  # the first version at this size checks TensorFlow's flat call
            served = _unbound(fn, public, tf.constant(sample), weights)
            self._flat[size] = served is not public
        else:
            served = _flat_call(fn, weights) if flat else public
        return served, served(tf.constant(sample)).numpy()

    def learned(self, seconds: dict[int, tuple[float, float]]) -> None:
        self.timings.update({n: t for n, t in seconds.items() if min(t) > 0})


class Programs:
    """Compiled programs by signature graph, the most recently used few (one per model served)."""

    KEPT = 8

    def __init__(self) -> None:
        self._by_graph: collections.OrderedDict[bytes, XlaProgram] = collections.OrderedDict()
        self._lock = threading.Lock()

    def for_signature(self, signature: tf.types.experimental.ConcreteFunction) -> XlaProgram:
        """The program of an earlier version with this graph, else a new one (kept for the next)."""
        key = _graph_key(signature)
        with self._lock:
            program = self._by_graph.get(key)
            if program is None:
                program = self._by_graph[key] = XlaProgram()
                while len(self._by_graph) > self.KEPT:
                    self._by_graph.popitem(last=False)
            self._by_graph.move_to_end(key)
            return program


programs = Programs()  # one per process: a server's versions, and every server in a test process


def _graph_key(signature: tf.types.experimental.ConcreteFunction) -> bytes:
    """What makes two versions' compiled programs the same: the signature's graph (ops, constants,
    input shapes) and the shape and type of every variable it captures, without what differs between
    two exports of one architecture and changes no computation (the ids TensorFlow writes into its
    capture placeholders, the counters in its function names). The weights' values are not in it."""
    graph = signature.graph.as_graph_def()
    functions = graph.library.function
    renamed = {f.signature.name: f"function {index}" for index, f in enumerate(functions)}
    for f in functions:
        f.signature.name = renamed[f.signature.name]
    for gradient in graph.library.gradient:
        gradient.function_name = renamed.get(gradient.function_name, gradient.function_name)
        gradient.gradient_func = renamed.get(gradient.gradient_func, gradient.gradient_func)
    nodes = [*graph.node, *(node for f in functions for node in f.node_def)]
    attrs = [*(node.attr for node in nodes), *(a.attr for f in functions for a in f.arg_attr.values())]
    for attr in attrs:
        attr.pop(_CAPTURE_ID, None)
        for value in attr.values():
            called = [value.func] if value.HasField("func") else list(value.list.func)
            for func in called:
                func.name = renamed.get(func.name, func.name)
    key = hashlib.sha256(graph.SerializeToString(deterministic=True))
    for tensor in signature.captured_inputs:
        if tensor.dtype == tf.resource:
            handle = getattr(tensor, "_handle_data", None)  # the variable's shape and type
            if handle is None:  # another TF version: the variables cannot be compared, so never shared
                return os.urandom(32)
            key.update(handle.SerializeToString(deterministic=True))
        else:
            key.update(f"{tensor.dtype.name}{tensor.shape}".encode())
    return key.digest()


_CAPTURE_ID = "_user_specified_name"  # on a capture placeholder: the exporting process's tensor id


def _unbound(
    fn: tf.types.experimental.ConcreteFunction,
    public: Callable[[tf.Tensor], tf.Tensor],
    sample: tf.Tensor,
    weights: Sequence[tf.Tensor] = (),
) -> Callable[[tf.Tensor], tf.Tensor]:
    """`public(images)` (the image tensor, one output) without the argument binding TensorFlow's
    call does every time (canonicalize, cast and flatten the structured inputs): 0.1-0.2 ms of
    Python per call on this 2-core host, a third of a tiny model's batch 1 (bench/NOTES.md). The one
    input is always a uint8 tensor of the traced shape, so there is nothing to bind. Uses the
    ConcreteFunction's own `_call_flat` (what its public call ends in), checked on `sample` against
    the public call; `public` itself where that is missing or differs (another TF version).
    `weights` are the arguments after the images (an `XlaProgram`'s)."""
    if getattr(fn, "_call_flat", None) is None:
        return public
    call = _flat_call(fn, weights)
    try:
        same = np.allclose(call(sample).numpy(), public(sample).numpy(), rtol=0.0, atol=1e-6)
    except Exception:  # any failure of the private path: keep the public one
        same = False
    if not same:
        log.info("the %s call goes through TensorFlow's argument binding", getattr(fn, "name", "model"))
    return call if same else public


def _flat_call(
    fn: tf.types.experimental.ConcreteFunction, weights: Sequence[tf.Tensor] = ()
) -> Callable[[tf.Tensor], tf.Tensor]:
    """fn(images, *weights) through its flat call (see `_unbound`)."""
    flat, rest = fn._call_flat, list(weights)

    def call(images: tf.Tensor) -> tf.Tensor:
        out = flat([images, *rest], fn.captured_inputs)
        return out[OUTPUT] if isinstance(out, dict) else out

    return call


@contextlib.contextmanager
def _out_of_memory(doing: str) -> Iterator[None]:
    """TF's ResourceExhaustedError (GPU or host out of memory) is RESOURCE_EXHAUSTED, not INTERNAL."""
    try:
        yield
    except tf.errors.ResourceExhaustedError as exc:
        log.warning("out of memory %s: %s", doing, str(exc).splitlines()[0][:300] if str(exc) else "")
        raise ResourceExhausted(
            f"the server ran out of memory {doing}; retry later, with fewer images, or on another replica"
        ) from None


def load(path: str, name: str, version: int, *, xla_sizes: Sequence[int] = ()) -> LoadedModel:
    """Load one version folder (blocking: the manager calls it on its loader thread)."""
    return LoadedModel(path, name, version, xla_sizes=xla_sizes)


def _best_times(
    a: Callable[[np.ndarray], object],
    b: Callable[[np.ndarray], object],
    arg: np.ndarray,
    pace: Pace = unpaced,
) -> tuple[float, float]:
    """The best of a few calls of each, alternating, so that other work on the machine (requests
    being served meanwhile) slows both alike; each call timed on its own, not its wait in `pace`."""
    best = [float("inf"), float("inf")]
    for _ in range(_TIMED_CALLS):
        for i, call in enumerate((a, b)):
            best[i] = min(best[i], pace(lambda call=call: _timed(call, arg)))
    return best[0], best[1]


def _timed(call: Callable[[np.ndarray], object], arg: np.ndarray) -> float:
    start = time.perf_counter()
    call(arg)
    return time.perf_counter() - start


def _resize(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    image = tf.image.resize(image, [height, width], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
