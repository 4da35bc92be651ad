"""Publish the benchmark models with the trainer's export code: ResNet50 at 96 px, a tiny CNN at 32 px,
and null models at 96 and 224 px (bench/host_path.py: the host's cost with a model that costs nothing).

Random weights: speed does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

LABELS = [f"class_{i}" for i in range(10)]


def resnet50(size: int):
    import tf_keras as keras

    inputs = keras.Input((size, size, 3), dtype="float32")
    x = keras.layers.Lambda(keras.applications.resnet50.preprocess_input)(inputs)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(size, size, 3))
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    return keras.Model(inputs, outputs)


def tiny(size: int):
    import tf_keras as keras

    inputs = keras.Input((size, size, 3), dtype="float32")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    for filters in (8, 16, 32):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    return keras.Model(inputs, outputs)


def null(size: int):
    """A model that costs (next to) nothing yet reads its input: one pixel per image, times zero, plus
    a fixed bias through a softmax. The batch dimension flows from the input, so a wrong shape fails
    as it would with a real model, and the answer is one constant distribution per image."""
    import tf_keras as keras

    inputs = keras.Input((size, size, 3), dtype="float32")
    x = keras.layers.Lambda(lambda images: images[:, 0, 0, :1] * 0.0)(inputs)
    bias = keras.initializers.Constant([0.1 * i for i in range(len(LABELS))])
    outputs = keras.layers.Dense(
        len(LABELS), activation="softmax", kernel_initializer="zeros", bias_initializer=bias
    )(x)
    return keras.Model(inputs, outputs)


def _export_the_keras_object() -> None:
    """Make export_model save the Keras object on the root, as versions were exported before."""
    from fovea import contract
    from fovea.trainer import export

    plain = export.build_servable

    def keras_format(model, *args, **kwargs):
        module, signatures = plain(model, *args, **kwargs)
        delattr(module, contract.WEIGHTS)
        setattr(module, contract.MODEL_OBJECT_OLD, model)
        return module, signatures

    export.build_servable = keras_format


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="models folder")
    parser.add_argument("--which", default="resnet50,tiny")
    parser.add_argument(
        "--keras-format",
        action="store_true",
        help="the SavedModel layout before contract.WEIGHTS: the Keras object on the root (bench/load_lag.py)",
    )
    args = parser.parse_args()

    from fovea.trainer.export import export_model

    if args.keras_format:
        _export_the_keras_object()

    builders = {"resnet50": (resnet50, 96), "tiny": (tiny, 32), "null96": (null, 96), "null224": (null, 224)}
    for name in args.which.split(","):
        build, size = builders[name]
        path = export_model(
            build(size), models_dir=args.out, name=name, labels=LABELS, input_size=(size, size), backbone=name
        )
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
