"""fovea.trainer: fine-tune an ImageNet backbone on a folder of images and publish a SavedModel."""

import importlib.util

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tf_keras") is None:
    raise ImportError("fovea.trainer needs the trainer extra: pip install 'fovea[trainer]'")
