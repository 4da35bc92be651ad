"""The classifier: augmentation -> preprocess_input -> base (inference mode) -> GAP -> dropout -> softmax.

Takes float32 RGB 0..255 [N, H, W, 3], the export contract's input. Augmentation layers act only
when the model is called with training=True (i.e. inside fit), never in evaluation or serving.
"""

from __future__ import annotations

from typing import Any

from fovea.trainer.backbones import build_base, preprocess_fn
from fovea.trainer.config import Augmentation, TrainConfig
from fovea.trainer.parent import is_published_version


def augmentation_layers(aug: Augmentation, seed: int) -> list[Any]:
    """Keras preprocessing layers; the 'photo' preset is the classic ImageDataGenerator recipe."""
    import tensorflow as tf
    from tf_keras import layers

    out: list[Any] = []
    if aug.flip:
        out.append(layers.RandomFlip("horizontal", seed=seed, name="aug_flip"))
    if aug.rotation > 0:
        # RandomRotation's factor is a fraction of a full turn.
        out.append(
            layers.RandomRotation(
                aug.rotation / 360.0, fill_mode="reflect", seed=seed + 1, name="aug_rotation"
            )
        )
    if aug.zoom > 0:
        out.append(layers.RandomZoom(aug.zoom, fill_mode="reflect", seed=seed + 2, name="aug_zoom"))
    if aug.shift > 0:
        out.append(
            layers.RandomTranslation(
                aug.shift, aug.shift, fill_mode="reflect", seed=seed + 3, name="aug_shift"
            )
        )
    if aug.brightness > 0:
        out.append(
            layers.RandomBrightness(
                aug.brightness, value_range=(0.0, 255.0), seed=seed + 4, name="aug_brightness"
            )
        )
    if aug.contrast > 0:
        out.append(layers.RandomContrast(aug.contrast, seed=seed + 5, name="aug_contrast"))
        # RandomContrast can leave 0..255; keep the pixels the backbone was trained on.
        out.append(layers.Lambda(lambda t: tf.clip_by_value(t, 0.0, 255.0), name="aug_clip"))
    return out


def build_model(cfg: TrainConfig, num_classes: int) -> tuple[Any, Any]:
    """(model, base). The base is called with training=False so BatchNorm always uses its statistics."""
    import tf_keras as keras

    keras.utils.set_random_seed(cfg.seed)
    size = cfg.input_size
    # A published version's weights are loaded into the whole model afterwards (parent.py).
    base = build_base(cfg.backbone, size, "none" if is_published_version(cfg.weights) else cfg.weights)
    preprocess = preprocess_fn(cfg.backbone)

    inputs = keras.Input((size, size, 3), dtype="float32", name="images")
    x = inputs
    for layer in augmentation_layers(cfg.augmentation(), cfg.seed):
        x = layer(x)
    x = preprocess(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if cfg.head_norm == "layer":
        x = keras.layers.LayerNormalization(name="head_norm")(x)
    elif cfg.head_norm == "batch":
        # A short memory: the statistics must settle within the few steps of a small dataset.
        x = keras.layers.BatchNormalization(momentum=0.9, name="head_norm")(x)
    if cfg.dropout > 0:
        x = keras.layers.Dropout(cfg.dropout, seed=cfg.seed, name="dropout")(x)
    regularizer = keras.regularizers.l2(cfg.l2) if cfg.l2 > 0 else None
    # float32 output even under mixed_float16, so the softmax and the loss stay stable.
    outputs = keras.layers.Dense(
        num_classes,
        activation="softmax",
        kernel_regularizer=regularizer,
        dtype="float32",
        name="probabilities",
    )(x)
    return keras.Model(inputs, outputs, name=f"fovea_{cfg.backbone}"), base


def freeze_base(base: Any) -> None:
    """Phase 1: nothing in the base trains."""
    base.trainable = False


def unfreeze_top(base: Any, num_layers: int) -> list[str]:
    """Phase 2: unfreeze the top `num_layers` layers (0 = all), BatchNorm layers excepted.

    Returns the names of the layers that now train.
    """
    import tf_keras as keras

    base.trainable = True
    layers = base.layers
    cut = 0 if num_layers <= 0 else max(0, len(layers) - num_layers)
    trained = []
    for i, layer in enumerate(layers):
        frozen = i < cut or isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not frozen
        if not frozen and layer.weights:
            trained.append(layer.name)
    return trained
