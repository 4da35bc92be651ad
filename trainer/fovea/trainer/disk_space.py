"""Disk space for a training run: checked before it trains, and a full disk met anyway told in one line.

A run writes two things: the published version under MODELS/<name>/ (first as a hidden .tmp-* folder,
renamed into place) and its backup (Keras BackupAndRestore checkpoints plus the phase weights) under
--backup-dir. `check` estimates both from the model's parameter count, or the version from the
newest published version of the same backbone, and refuses to start when a file system holding them
has less free; `is_disk_full` recognises ENOSPC however TensorFlow, Keras, h5py or numpy report it.
Object stores (gs://, s3://) have no free-space figure and are not checked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
from collections.abc import Callable
from pathlib import Path

MIB = 1 << 20
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_MESSAGES = ("no space left on device", "disk quota exceeded")


class DiskFullError(RuntimeError):
    """Not enough disk space for the run (up front), or a disk filled up while it ran; one line."""


def mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB" if n >= MIB else f"{n / MIB:.1f} MiB"


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under a local folder (0 when it does not exist)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# Parameters of each backbone without its top (Keras applications, any input size): the disk check
# runs before the model is built, which takes longer than the check. The head adds features x classes
# (2048 or 512 per class: under 1% of the base for a hundred classes), inside the 8 MiB slack below.
# tests/test_trainer_faults.py checks the table against the built bases.
BACKBONE_PARAMS = {"resnet50": 23_587_712, "vgg16": 14_714_688, "vgg19": 20_024_384}


def version_bytes(params: int, reference_bytes: int | None) -> int:
    """A published version: its variables are the float32 weights once (4 bytes a parameter), plus the
    graph, labels and report (a few MiB: 8 MiB allowed). A published version of the same backbone
    and input size, when there is one, has measured all that for this model."""
    return reference_bytes if reference_bytes else params * 4 + 8 * MIB


def backup_bytes(params: int, fine_tune: bool) -> int:
    """An upper bound for the backup folder at its fullest (phase 2 when fine-tuning, else phase 1).

    weights = params x 4 bytes (float32). A BackupAndRestore checkpoint holds the weights plus Adam's
    two slots per trainable variable (at most 2 x weights once the base is unfrozen, next to nothing
    while only the head trains), and a new checkpoint is written before the old one is deleted (x 2).
    Beside it, the phase weights (.npz): phase 1's final and best, and phase 2's (4 x weights in all;
    2 without fine-tuning). Fine-tuning: 2 x (1 + 2) + 4 = 10 x weights; head only: 2 x 1 + 2 = 4 x.
    """
    weights = params * 4
    return weights * (10 if fine_tune else 4)


def free_bytes(path: str) -> int:
    """Space an unprivileged writer may still use on the file system holding `path` (the nearest
    existing folder above it when it does not exist yet)."""
    return shutil.disk_usage(_existing(path)).free


def _existing(path: str) -> str:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def _device(path: str) -> int:
    return os.stat(_existing(path)).st_dev


def check(
    *,
    model_root: str,
    backup_dir: str,
    params: int,
    fine_tune: bool,
    reference: Callable[[], int | None],
    publishes: bool,
    log: Callable[[str], None],
) -> None:
    """Raise DiskFullError naming the path, the space needed and the space free when a run would not
    fit; `reference()` gives the size of a published version of the same model, if any."""
    needs: dict[str, list[tuple[str, int]]] = {}  # device -> [(what, bytes)]
    paths: dict[str, str] = {}
    if publishes and "://" not in model_root:
        version = version_bytes(params, reference())
        key = str(_device(model_root))
        needs.setdefault(key, []).append(("a version", version))
        paths.setdefault(key, model_root)
    if "://" not in backup_dir:
        # A resumed run's backup already holds part of what it needs.
        backup = max(0, backup_bytes(params, fine_tune) - tree_bytes(backup_dir))
        key = str(_device(backup_dir))
        needs.setdefault(key, []).append(("the backup", backup))
        paths.setdefault(key, backup_dir)
    for key, items in needs.items():
        needed = sum(n for _, n in items)
        free = free_bytes(paths[key])
        what = " + ".join(f"{label} {mib(n)}" for label, n in items)
        if needed > free:
            raise DiskFullError(
                f"not enough disk space: {paths[key]} needs {mib(needed)} ({what}; {params:,} parameters) "
                f"and has {mib(free)} free"
            )
        log(f"disk space: {paths[key]} needs about {mib(needed)} ({what}), {mib(free)} free")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception's chain, as errno or in the message (TensorFlow and
    h5py report it as text)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            return True
        if any(m in str(current).lower() for m in FULL_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


def filled(exc: BaseException, model_root: str, backup_dir: str, removed: list[str]) -> DiskFullError:
    """The one line for a disk that filled up mid-run, with the space now free where the run writes."""
    where = [p for p in dict.fromkeys([model_root, backup_dir]) if "://" not in p]
    free = ", ".join(f"{p} {mib(free_bytes(p))} free" for p in where)
    filename = getattr(exc, "filename", None)
    at = f" writing {filename}" if filename else ""
    cleaned = f"; removed {', '.join(removed)}" if removed else ""
    return DiskFullError(f"the disk filled up{at} (no space left on device): {free}{cleaned}")


def reference_version_bytes(model_root: str, backbone: str, input_size: int) -> int | None:
    """Bytes of the newest published version of `backbone` at `input_size` under a local model folder."""
    from fovea.trainer.export import list_versions, read_metadata

    for version in reversed(list_versions(model_root)):
        path = posixpath.join(model_root, str(version))
        try:
            meta = read_metadata(path)
        except ValueError:
            continue
        if meta.backbone == backbone and (meta.input_height, meta.input_width) == (input_size, input_size):
            return tree_bytes(path)
    return None
