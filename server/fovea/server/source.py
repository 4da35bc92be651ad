"""The source: which models and versions the model folder holds (TF Serving's "source").

`<base>/<name>/<version>/` folders; which version folders count is the export contract's rule. The
folder is read through a `Storage` (loader.GFileStorage in the server, so any tf.io.gfile path works)
so this module needs no TensorFlow.
"""

from __future__ import annotations

import posixpath
from typing import Protocol


class Storage(Protocol):
    def listdir(self, path: str) -> list[str]:
        """Entry names without a trailing slash; [] when `path` is not a folder."""
        ...

    def isdir(self, path: str) -> bool: ...

    def exists(self, path: str) -> bool: ...


class ModelSource:
    def __init__(self, base: str, storage: Storage) -> None:
        self.base = base
        self._storage = storage

    def model_names(self) -> list[str]:
        """Model folders under the base folder (hidden ones skipped), sorted."""
        s = self._storage
        names = (n for n in s.listdir(self.base) if n and not n.startswith("."))
        return sorted(n for n in names if s.isdir(posixpath.join(self.base, n)))

    def versions(self, name: str) -> list[int]:
        """Complete published versions of one model: positive integer folders holding saved_model.pb.

        Exports are renamed into place from hidden `.tmp-*` folders, so a listed version is whole.
        """
        root = posixpath.join(self.base, name)
        found = []
        for entry in self._storage.listdir(root):
            complete = entry.isdigit() and self._storage.exists(posixpath.join(root, entry, "saved_model.pb"))
            if complete and int(entry) > 0:
                found.append(int(entry))
        return sorted(found)

    def scan(self) -> dict[str, list[int]]:
        """Every model folder and its published versions (blocking: run it off the event loop)."""
        return {name: self.versions(name) for name in self.model_names()}
