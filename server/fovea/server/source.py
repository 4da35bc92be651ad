"""The source: which models and versions the model folder holds (TF Serving's "source").

`<base>/<name>/<version>/` folders, or, given a model name, `<base>/<version>/` as that one model's
root (what KServe's storage initializer puts at /mnt/models); which version folders count is
fovea.contract's rule. The
folder is read through a `Storage` (loader.GFileStorage in the server, so any tf.io.gfile path works)
so this module needs no TensorFlow.
"""

from __future__ import annotations

import posixpath
from typing import Protocol

from fovea import contract
from fovea.contract.rollout import ROLLOUT_FILE


class Storage(Protocol):
    # Every method raises OSError (PermissionError for a permission error) when storage fails in any
    # way but "not found"; only a real absence reads as [] or False.
    def listdir(self, path: str) -> list[str]:
        """Entry names without a trailing slash; [] when `path` is not a folder."""
        ...

    def isdir(self, path: str) -> bool: ...

    def exists(self, path: str) -> bool: ...

    def read(self, path: str) -> bytes | None:
        """A small file's bytes; None when it does not exist."""
        ...


class ModelSource:
    def __init__(self, base: str, storage: Storage, model_name: str = "") -> None:
        self.base = base
        self._storage = storage
        self._single = model_name  # the base folder is this one model's root

    def root(self, name: str) -> str:
        """The folder holding one model's version folders."""
        return self.base if self._single else posixpath.join(self.base, name)

    def model_names(self) -> list[str]:
        """Model folders under the base folder (hidden ones skipped), sorted; or the one model."""
        if self._single:
            return [self._single]
        s = self._storage
        names = (n for n in s.listdir(self.base) if n and not n.startswith("."))
        return sorted(n for n in names if s.isdir(posixpath.join(self.base, n)))

    def versions(self, name: str) -> list[int]:
        """The complete published versions of one model, ascending (the contract's rule)."""
        return contract.published_versions(self.root(name), self._storage.listdir, self._storage.exists)

    def rollout(self, name: str) -> bytes | None:
        """The model's rollout.json (fovea.contract.rollout), None without one (blocking I/O)."""
        return self._storage.read(posixpath.join(self.root(name), ROLLOUT_FILE))

    def scan(self) -> dict[str, list[int]]:
        """Every model folder and its published versions (blocking: run it off the event loop)."""
        return {name: self.versions(name) for name in self.model_names()}

    def nothing_found(self) -> tuple[str, str]:
        """Why a scan found no version, as a metric reason and one log line with the layout it
        expects (blocking I/O)."""
        base, s = self.base, self._storage
        if self._single:
            layout = posixpath.join(base, "<version>", contract.SAVED_MODEL_FILE)
        else:
            layout = posixpath.join(base, "<model name>", "<version>", contract.SAVED_MODEL_FILE)
        if not s.isdir(base):
            return MODEL_DIR_MISSING, f"--model-dir {base} does not exist (expected {layout})"
        names = sorted(n for n in s.listdir(base) if n and not n.startswith("."))
        if not names:
            return MODEL_DIR_EMPTY, f"--model-dir {base} is empty (expected {layout})"
        parent = posixpath.dirname(base.rstrip("/"))
        if self._single:
            why = f"--model-dir {base} holds no complete version of {self._single} in {', '.join(names)} (expected {layout})"
        elif contract.published_versions(base, s.listdir, s.exists):
            why = f"--model-dir {base} is one model's folder (versions {', '.join(names)}): use its parent, {parent}"
        elif contract.version_of(posixpath.basename(base.rstrip("/"))) and contract.published_versions(
            parent, s.listdir, s.exists
        ):
            why = f"--model-dir {base} is a version folder: use the folder above its model, {posixpath.dirname(parent)}"
        else:
            why = f"--model-dir {base} has no complete version in {', '.join(names)} (expected {layout})"
        return NO_COMPLETE_VERSION, why


# Why a scan cannot be trusted to retire anything (fovea_model_dir_problems' reason label).
MODEL_DIR_MISSING = "model_dir_missing"
MODEL_DIR_EMPTY = "model_dir_empty"
NO_COMPLETE_VERSION = "no_complete_version"


def failure_reason(exc: BaseException) -> str:
    """The reason label of a listing that raised: a Storage raises OSError for file system errors."""
    if isinstance(exc, PermissionError):
        return "permission_denied"
    return "io_error" if isinstance(exc, OSError) else "error"
