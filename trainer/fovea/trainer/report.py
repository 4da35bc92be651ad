"""The training report: metrics.json, training_curves.png and confusion_matrix.png."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_report(report_dir: str | Path, *, metrics: dict[str, Any], labels: Sequence[str]) -> None:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    plot_curves(
        metrics.get("history", []),
        out / "training_curves.png",
        fine_tune_start=metrics.get("fine_tune_start_epoch"),
        best_epoch=metrics.get("best_epoch"),
    )
    test = metrics.get("test", {})
    if test.get("confusion_matrix"):
        plot_confusion(
            np.asarray(test["confusion_matrix"]), labels, out / "confusion_matrix.png", test.get("accuracy")
        )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    history: Sequence[dict[str, float]],
    path: str | Path,
    *,
    fine_tune_start: int | None,
    best_epoch: int | None,
) -> None:
    """Loss and accuracy per epoch, train vs validation, across both phases (epochs numbered from 1)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    epochs = [int(r["epoch"]) + 1 for r in history]
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        for prefix, style, name in (("", "-o", "train"), ("val_", "-s", "validation")):
            values = [r.get(prefix + key, np.nan) for r in history]
            ax.plot(epochs, values, style, markersize=4, linewidth=1.6, label=name)
        if fine_tune_start is not None and history and fine_tune_start < len(history):
            x = fine_tune_start + 0.5
            ax.axvspan(x, epochs[-1] + 0.5, color="tab:orange", alpha=0.07, linewidth=0)
            ax.axvline(x, color="grey", linestyle="--", linewidth=1.2, label="fine-tuning starts")
        if best_epoch is not None:
            best = [r for r in history if int(r["epoch"]) + 1 == best_epoch]  # best_epoch counts from 1
            if best and "val_" + key in best[0]:
                ax.plot(
                    best_epoch, best[0]["val_" + key], marker="*", markersize=16, color="crimson",
                    linestyle="none", label=f"restored best (epoch {best_epoch})", zorder=5,
                )  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(0.4, epochs[-1] + 0.8)  # room for the best-epoch star at the last epoch
            ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        if key == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Training curves (phase 1: frozen base; phase 2: fine-tuning)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(
    matrix: np.ndarray, labels: Sequence[str], path: str | Path, accuracy: float | None
) -> None:
    """Counts per (true, predicted) class, with row-normalised colour so small classes read clearly."""
    plt = _pyplot()
    k = len(labels)
    size = max(4.5, 0.6 * k + 3)
    fig, ax = plt.subplots(figsize=(size + 1, size), constrained_layout=True)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=10,
                color="white" if share[i, j] > 0.5 else "black",
            )  # fmt: skip
    ax.set_xticks(range(k), labels, rotation=35, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    title = "Confusion matrix (test split)"
    if accuracy is not None:
        title += f", accuracy {accuracy:.3f}"
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.savefig(path, dpi=110)
    plt.close(fig)
