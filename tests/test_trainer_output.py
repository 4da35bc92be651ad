"""What the trainer shows: one best epoch everywhere, and progress one line per epoch in files and pipes.

metrics.json (and so `fovea metadata`), the console and the plot count epochs from 1, as Keras prints
them ("Epoch 22/30").

metrics.json's value against Keras's restored weights: tests/test_trainer_phases.py (slow); the console
and `fovea metadata` against it: the training Job's pod in scripts/podman_e2e.sh."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="the trainer tests need the trainer extra")

from fovea.trainer import report
from fovea.trainer.resume import best_epoch_of

# Keras's history rows: "epoch" counts from 0. The best validation loss is at row 1, i.e. epoch 2.
HISTORY = [
    {"epoch": 0, "loss": 1.0, "val_loss": 0.9, "accuracy": 0.5, "val_accuracy": 0.5},
    {"epoch": 1, "loss": 0.8, "val_loss": 0.5, "accuracy": 0.6, "val_accuracy": 0.7},
    {"epoch": 2, "loss": 0.7, "val_loss": 0.6, "accuracy": 0.7, "val_accuracy": 0.6},
]


def test_best_epoch_is_numbered_from_one_in_the_plot(tmp_path, monkeypatch):
    assert best_epoch_of(HISTORY) == 1  # the row index
    labels = []
    plt = report._pyplot()
    original = plt.Figure.savefig

    def capture(fig, path, **kwargs):
        for ax in fig.axes:
            labels.extend(line.get_label() for line in ax.get_lines())
            labels.extend(
                f"{line.get_label()}@{line.get_xdata()[0]}"
                for line in ax.get_lines()
                if "best" in line.get_label()
            )
        return original(fig, path, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", capture)
    report.plot_curves(HISTORY, tmp_path / "curves.png", fine_tune_start=None, best_epoch=2)
    assert "restored best (epoch 2)" in labels
    assert "restored best (epoch 2)@2" in labels  # drawn at x = 2 on the 1-based axis
    assert (tmp_path / "curves.png").is_file()


def test_progress_is_one_line_per_epoch_when_not_a_terminal():
    import io

    from fovea.trainer.train import keras_verbose

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert keras_verbose(1, io.StringIO()) == 2  # a file or a pipe: one line per epoch
    assert keras_verbose(1, Terminal()) == 1  # a terminal keeps the progress bar
    assert keras_verbose(0, io.StringIO()) == 0 and keras_verbose(2, Terminal()) == 2


@pytest.mark.slow
def test_a_chance_level_run_from_scratch_says_so_and_names_what_was_trained(tmp_path, capsys):
    """Noise images with arbitrary labels cannot be learned: the run must end near chance and say so
    at the end of training, in metrics.json and in the report, and its log must not contradict itself."""
    import json

    import numpy as np
    from fovea.cli import main as cli_main
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for label in ("a", "b", "c"):
        (data / label).mkdir(parents=True)
        for i in range(20):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / label / f"{i}.png")
    rc = cli_main(
        [
            "train", "--data", str(data), "--models", str(tmp_path / "models"), "--name", "m",
            "--backbone", "vgg16", "--weights", "none", "--input-size", "32", "--epochs", "1",
            "--fine-tune-epochs", "1", "--batch-size", "8", "--test-split", "0.3", "--verbose", "2",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    assert "up to 1 epoch," in out and "1 epochs" not in out
    assert "frozen, randomly initialised vgg16 (--weights none)" in out
    assert "phase 2: training the whole network" in out
    assert "Restoring model weights" not in out  # fovea says which epoch it keeps, once
    kept = [line for line in out.splitlines() if line.startswith("phase 2: ") and "best epoch, 2 " in line]
    assert len(kept) == 1, kept  # either phase 2's best epoch is kept or phase 1's: one line says which
    assert "vgg16 at 32x32 px, base weights: random (--weights none: trained from scratch)" in out
    assert "\nWARNING: test accuracy " in out and "near chance" in out and "--weights imagenet" in out

    report_dir = tmp_path / "models" / "m" / "1" / "report"
    saved = json.loads((report_dir / "metrics.json").read_text())
    assert saved["warnings"] and "near chance" in saved["warnings"][0]
    assert (saved["backbone"], saved["input_size"]) == ("vgg16", 32)
    assert f"training took {saved['train_seconds']:.0f} s" in out  # one figure, measured once
    page = (report_dir / "index.html").read_text()
    assert "near chance" in page and "<th>base weights</th><td>random (--weights none" in page
    assert f"{saved['train_seconds']:.0f} s on 1 replica(s)" in page


def test_a_lower_learning_rate_is_announced_as_the_epoch_using_it_begins():
    """Keras's ReduceLROnPlateau says "Epoch 3: reducing learning rate" after epoch 3, which reads as if
    epoch 3 used it; fovea says it when epoch 4, the first to use it, begins."""
    from types import SimpleNamespace

    import numpy as np
    import tf_keras as keras
    from fovea.trainer.train import _learning_rate_notice

    said: list[str] = []
    session = SimpleNamespace(log=said.append, cfg=SimpleNamespace(reduce_lr_patience=2))

    class Lower(keras.callbacks.Callback):  # what ReduceLROnPlateau does at the end of epoch 1
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                keras.backend.set_value(self.model.optimizer.learning_rate, 1e-4)

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = np.zeros((4, 2), np.float32)
    model.fit(x, x[:, :1], epochs=3, verbose=0, callbacks=[Lower(), _learning_rate_notice(session)])
    assert said == ["epoch 2: learning rate lowered to 0.0001 (val_loss had not improved for 2 epochs)"]
