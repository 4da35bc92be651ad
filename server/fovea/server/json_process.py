"""Large REST JSON bodies parsed in a child process, so json.loads does not hold the server's GIL.

json.loads is one C call that keeps the GIL for the whole parse: on the parse thread, a 16 MiB body
still stalled the event loop (and so gRPC health) for 0.4-0.7 s. Bodies whose JSON is SMALL_JSON or
more go to one child process instead (`python -m fovea.server.json_process`, started with
subprocess: fork and exec at once, so none of the server's TensorFlow threads is copied into a
forked image); it runs v2_json.parse and sends back the result packed to unpickle fast (UINT8 as
bytes, BYTES as one blob). Smaller bodies stay on the parse thread and pay no IPC.

- **One at a time.** The one parse thread is the only caller, so the child holds at most one
  message and its parse (docs/memory.md, "http"; memory.json_parse_bytes).
- **Death.** If the child dies or does not answer within PARSE_TIMEOUT_S, it is killed, the request
  is answered UNAVAILABLE (503, counted), and the next large body starts a new one.
- **Shutdown.** `close()` (the server's stop) closes the child's stdin and waits for it; if the
  server dies without closing, the child reads end-of-file on its stdin and exits, so none is left.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import traceback

from fovea.server import errors, memory, v2_json

log = logging.getLogger(__name__)

SMALL_JSON = memory.SMALL_JSON  # JSON below this parses on the thread: the common request pays no IPC
PARSE_TIMEOUT_S = 60.0  # far above a 16 MiB parse (~1 s); only a stuck child takes this long
_REQUEST = struct.Struct("<QQ")  # the header's length, the binary part's size
_REPLY = struct.Struct("<Q")


class ParseProcessFailed(errors.Unavailable):
    """The parse process died or hung: this request is lost, the next one gets a new process."""


class JsonParser:
    """`parse` as v2_json.parse, large headers in the child process. Not for concurrent callers."""

    def __init__(self, small: int = SMALL_JSON, timeout_s: float = PARSE_TIMEOUT_S) -> None:
        self._small = small
        self._timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.restarts = 0  # children started after one died (read by tests and the log)

    def parse(self, header: bytes, binary_size: int) -> v2_json.JsonInfer:
        if len(header) < self._small:
            return v2_json.parse(header, binary_size)
        with self._lock:
            return self._in_child(header, binary_size)

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _start(self) -> subprocess.Popen:
        if self._proc is not None:
            self.restarts += 1
        # The child imports fovea.server.v2_json from where this process found it.
        path = os.pathsep.join(p for p in sys.path if p)
        env = {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fovea.server.json_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        return self._proc

    def _in_child(self, header: bytes, binary_size: int) -> v2_json.JsonInfer:
        proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
        # A child that stops answering is killed, which ends the blocked write or read below.
        watchdog = threading.Timer(self._timeout_s, proc.kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(_REQUEST.pack(len(header), binary_size))
            proc.stdin.write(header)
            proc.stdin.flush()
            size = proc.stdout.read(_REPLY.size)
            reply = proc.stdout.read(_REPLY.unpack(size)[0]) if len(size) == _REPLY.size else b""
            if len(size) != _REPLY.size or len(reply) != _REPLY.unpack(size)[0]:
                raise EOFError
        except (OSError, EOFError, ValueError):
            timed_out = watchdog.finished.is_set()  # not cancelled yet: set only if it fired
            proc.kill()
            code = proc.wait()
            log.warning(
                "the JSON parse process %s (exit code %s); the next large request starts a new one",
                "did not answer in time" if timed_out else "died",
                code,
            )
            raise ParseProcessFailed(
                "the server's JSON parser process stopped while parsing this request; retry it"
            ) from None
        finally:
            watchdog.cancel()
        status, payload = pickle.loads(reply)
        if status == "ok":
            return payload
        if status == "error":
            kind, message = payload
            raise getattr(errors, kind, errors.InvalidArgument)(message)
        raise RuntimeError(f"the JSON parse process failed:\n{payload}")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the child: end-of-file on its stdin, then a kill if it does not exit in time."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def main() -> int:
    """The child: parse requests from stdin until it closes (the server stopped or died)."""
    # Ctrl-C in a terminal reaches the whole process group: the server stops gracefully and closes
    # this process's stdin, which is what ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # On a busy machine the parse competes with the server for the CPU: the event loop (health,
    # every other call) goes first, a large body's parse takes longer.
    os.nice(10)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            length, binary_size = _REQUEST.unpack(_read(stdin, _REQUEST.size))
            header = _read(stdin, length)
        except EOFError:
            return 0
        try:
            reply = ("ok", v2_json.parse(header, binary_size).packed())
        except errors.ServingError as exc:
            reply = ("error", (type(exc).__name__, exc.message))
        except Exception:  # a bug or MemoryError: the server logs it and answers 500
            reply = ("failed", traceback.format_exc(limit=5))
        del header
        data = pickle.dumps(reply, protocol=5)
        del reply
        stdout.write(_REPLY.pack(len(data)))
        stdout.write(data)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
