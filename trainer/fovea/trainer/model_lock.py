"""One trainer per model at a time: an exclusive lock on MODELS/<name>/.train.lock.

Semantics. The lock is an fcntl.flock on a file in the model's folder, held for the whole run by the
process that publishes (the chief). A second trainer on the same model stops at once with an error that
names the holder (host, pid, start time); it never waits, and never resumes from the first one's
backup. The kernel releases the lock when its process exits, however it exits (SIGKILL included), so a
killed run never leaves a stale lock behind: the same command started again takes it and resumes. A run
that ends removes the file; a killed one leaves it, unlocked, hidden, and no version. flock works across processes on one machine and
on most NFS mounts (Linux emulates it with POSIX locks there); on an object store (gs://, s3://) there
is no lock, which the trainer says in its log: run one trainer per model there, e.g. one Kubernetes
Job per model name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = ".train.lock"


class ModelBusyError(RuntimeError):
    """Another trainer holds the model's lock."""


@contextlib.contextmanager
def model_lock(models_dir: str, name: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold MODELS/<name>/.train.lock for the duration; ModelBusyError when another process holds it."""
    if "://" in models_dir:
        log(f"no lock on {models_dir}: object stores have none; run one trainer per model there")
        yield
        return
    folder = Path(models_dir) / name
    created = [p for p in [folder, *folder.parents] if not p.exists()]  # innermost first
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        fd = _open_locked(path, name, models_dir)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        # Unlink while still holding the lock; a waiter that opened the old file sees it was replaced.
        path.unlink(missing_ok=True)
        os.close(fd)
        # A run that published nothing (refused for disk space, failed on its data) leaves no empty
        # model folder behind it.
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (a version, another run's lock) or already gone: keep the rest too


def _open_locked(path: Path, name: str, models_dir: str) -> int:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ModelBusyError(
                f"another trainer is training model {name!r} in {models_dir} ({holder}); wait for it to "
                "finish, or train under another --name"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd  # the file we locked is still the lock file
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed it between our open and our lock: try the new one


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"
