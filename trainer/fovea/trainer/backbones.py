"""The backbones: tf_keras.applications bases without their top, and their preprocessing."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fovea.contract import BACKBONES


class WeightsError(ValueError):
    """The requested base weights cannot be loaded; the message says what to do instead."""


def _applications(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    from tf_keras import applications

    table = {
        "resnet50": (applications.ResNet50, applications.resnet50.preprocess_input),
        "vgg16": (applications.VGG16, applications.vgg16.preprocess_input),
        "vgg19": (applications.VGG19, applications.vgg19.preprocess_input),
    }
    if name not in table:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return table[name]


def preprocess_fn(name: str) -> Callable[[Any], Any]:
    """The backbone's preprocess_input: float32 RGB 0..255 in, what the base expects out."""
    return _applications(name)[1]


def build_base(name: str, input_size: int, weights: str = "imagenet"):
    """The base model (include_top=False) for [input_size, input_size, 3] inputs.

    weights: "imagenet" (Keras downloads it once into ~/.keras/models), "none", or a path to an .h5
    file holding the weights of this base without its top (as `base.save_weights("x.h5")` writes).
    A published version is not loaded here: the model is built with a random base and
    parent.load_parent() fills the whole model in.
    """
    constructor, _ = _applications(name)
    shape = (input_size, input_size, 3)
    choice = weights.strip()
    if choice.lower() == "none":
        return constructor(include_top=False, weights=None, input_shape=shape)
    if choice.lower() == "imagenet":
        try:
            return constructor(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:  # a failed download raises a bare Exception("URL fetch failure ...")
            raise WeightsError(
                f"could not get the imagenet weights for {name} ({str(exc)[:300]}); "
                f"without network access, pass --weights PATH (a local .h5 of the {name} base without "
                "its top, e.g. copied from ~/.keras/models on a machine that has it) or --weights none "
                "to train from random weights"
            ) from None
    if not os.path.isfile(choice):
        raise WeightsError(
            f"--weights {choice}: no such file; use imagenet, none, a path to an .h5 file, or a published "
            "version MODELS/NAME/VERSION"
        )
    base = constructor(include_top=False, weights=None, input_shape=shape)
    try:
        base.load_weights(choice)
    except Exception as exc:  # h5py and Keras raise several types for a mismatched or broken file
        raise WeightsError(
            f"--weights {choice}: does not fit the {name} base without its top "
            f"({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    return base
