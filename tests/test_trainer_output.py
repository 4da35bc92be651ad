"""What the trainer shows: one best epoch everywhere, and progress one line per epoch in files and pipes.

metrics.json (and so `fovea metadata`), the console and the plot count epochs from 1, as Keras prints
them ("Restoring model weights from the end of the best epoch: 22").

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
