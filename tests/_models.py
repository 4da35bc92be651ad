"""Small real models for tests: built with tf_keras and published with the trainer's export code.

Real SavedModels from the real export path, but tiny, so a test session can afford them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

LABELS = ("circle", "square", "triangle")


def build_tiny_model(input_size: int = 32, num_classes: int = len(LABELS), seed: int = 0):
    """A few convolutions: float32 RGB 0..255 in, softmax out (the export contract's model).

    The layers are named, as the trainer names its own: two builds in one process have the same
    graph, as two trainer runs do."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="images")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="tiny")


def export_tiny(
    models_dir: Path,
    name: str = "tiny",
    input_size: int = 32,
    labels: Sequence[str] = LABELS,
    seed: int = 0,
    calibration: dict | None = None,
) -> Path:
    """Publish the next version of a tiny model; return its folder."""
    from fovea.trainer.export import export_model

    model = build_tiny_model(input_size, len(labels), seed)
    path = export_model(
        model,
        models_dir=str(models_dir),
        name=name,
        labels=list(labels),
        input_size=(input_size, input_size),
        backbone="tiny-cnn",
        metrics={"test_accuracy": 0.5},
        config={"seed": seed},
        calibration=calibration,
    )
    return Path(path)


def tiny_train_config(data: Path, models: Path, **extra):
    """The smallest real training run: vgg16 from random weights, 32 px, one epoch, no fine-tuning."""
    from fovea.trainer.config import TrainConfig

    values = dict(
        data=str(data), models=str(models), name="m", backbone="vgg16", weights="none",
        input_size=32, epochs=1, fine_tune_epochs=0, batch_size=8, verbose=0,
        audit=False,  # the audit's own test turns it on; the others need not pay for it
    )  # fmt: skip
    values.update(extra)
    return TrainConfig(**values)
