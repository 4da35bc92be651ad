"""Training from a published version (--weights MODELS/NAME/VERSION): the usual weekly retrain.

Same classes, in the same order: the whole model (base and head) starts from the parent, and training
continues on the new data. Other classes: the base starts from the parent's, the head is new. Either
way the new version names its parent in fovea.json and in its report.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from typing import Any

from fovea import contract

CONTINUE = "continue"  # same classes: base and head from the parent
NEW_HEAD = "new head"  # other classes: the parent's base, a new head
# The layers of the head: their weights depend on the classes.
HEAD_LAYERS = ("probabilities",)


def is_published_version(weights: str) -> bool:
    """Whether --weights names a published version folder (it holds the metadata and a SavedModel)."""
    path = weights.strip()
    if path.lower() in ("imagenet", "none") or not path:
        return False
    if "://" in path:
        import tensorflow as tf

        return tf.io.gfile.exists(posixpath.join(path, contract.SAVED_MODEL_FILE))
    return os.path.isfile(os.path.join(path, contract.SAVED_MODEL_FILE)) and os.path.isfile(
        os.path.join(path, contract.METADATA_FILE)
    )


def saved_variables(loaded: Any) -> list[Any]:
    """A loaded version's model variables: the list kept under contract.WEIGHTS, or for a version
    exported before it, the variables of the Keras object kept under contract.MODEL_OBJECT_OLD; none
    for a SavedModel with neither (load_parent then says none of its weights fit)."""
    kept = getattr(loaded, contract.WEIGHTS, None)
    if kept is not None:
        return list(kept)
    return list(getattr(getattr(loaded, contract.MODEL_OBJECT_OLD, None), "variables", ()))


def load_parent(model: Any, version_dir: str, labels: Sequence[str], backbone: str) -> tuple[str, str]:
    """Copy a published version's weights into `model` (built by model.build_model for `labels`).

    Returns (parent, mode): the parent as "NAME/VERSION (path)" and CONTINUE or NEW_HEAD. Raises
    WeightsError when the parent cannot be the start of this model.
    """
    import tensorflow as tf
    from fovea.trainer.backbones import WeightsError
    from fovea.trainer.export import read_metadata

    version_dir = version_dir.rstrip("/")
    try:
        meta = read_metadata(version_dir)
    except ValueError as exc:
        raise WeightsError(f"--weights {version_dir}: {exc}") from None
    if meta.backbone != backbone:
        raise WeightsError(
            f"--weights {version_dir} is a {meta.backbone or 'non-fovea'} model; train it with "
            f"--backbone {meta.backbone} (it was --backbone {backbone})"
        )
    mode = CONTINUE if list(meta.labels) == list(labels) else NEW_HEAD
    # The SavedModel keeps the Keras model's variables with their names ("block1_conv1/kernel:0"),
    # which do not depend on the input size or on which augmentation layers the model has.
    source = {v.name: v for v in saved_variables(tf.saved_model.load(version_dir))}
    copied = 0
    for variable in model.variables:
        layer = variable.name.split("/", 1)[0]
        if layer.startswith("aug_") or (mode == NEW_HEAD and layer in HEAD_LAYERS):
            continue
        found = source.get(variable.name)
        if found is None:
            continue  # a layer the parent did not have (e.g. another --head-norm): it starts fresh
        if tuple(found.shape) != tuple(variable.shape):
            raise WeightsError(
                f"--weights {version_dir}: {variable.name} has shape {tuple(found.shape)} there, "
                f"{tuple(variable.shape)} here"
            )
        variable.assign(found)
        copied += 1
    if not copied:
        raise WeightsError(f"--weights {version_dir}: none of its weights fit this model")
    versions = contract.version_of(posixpath.basename(version_dir))
    parent = f"{meta.name}/{versions or meta.version} ({version_dir})"
    return parent, mode
