"""The training report, in each version's report/ folder.

metrics.json, training_curves.png, confusion_matrix.png, augmentation.png (training images as the
network sees them), mistakes.png (the test images it got wrong, or was least sure of), and index.html:
one self-contained page of all of it (images inlined, no network), the file a person opens.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fovea.trainer.config import TrainConfig
from fovea.trainer.gate import gate_html
from fovea.trainer.results import TrainMetrics

# A point is an outlier of a curve when it is this many times the next largest value; the axis is
# then cut above the rest and the outlier drawn at the edge with its value (one spike, e.g. the first
# epoch of fine-tuning, must not flatten every other epoch).
SPIKE_RATIO = 2.5
# A loss curve spanning more than this ratio is drawn on a log axis (the demo: 7.7 at the start of
# fine-tuning, 0.04 at its best epoch), so the late epochs, where the best one is, stay readable.
LOG_RATIO = 30.0


@dataclasses.dataclass
class Samples:
    """What the image grids need: the training files, and the test files with the model's answers."""

    train_files: Sequence[str]
    train_targets: Sequence[int]
    test_files: Sequence[str]
    test_probabilities: np.ndarray  # [N, classes], in test_files order
    test_truth: np.ndarray  # [N] label indices


def write_report(
    report_dir: str | Path,
    *,
    metrics: TrainMetrics,
    labels: Sequence[str],
    config: TrainConfig | None = None,
    samples: Samples | None = None,
    quality: Any = None,
) -> Path:
    """Write every report file; returns the path of index.html. `quality` (report_quality.Quality) adds
    the calibration and data-quality sections."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    recorded = metrics.to_dict()
    findings = getattr(quality, "audit", None)
    if findings is not None:
        # The audit's measurements, for a script to read: the OOD detection figures and the per-class
        # augmentation check.
        recorded["ood"] = findings.ood
        recorded["augmentation_check"] = findings.augmentation
    (out / "metrics.json").write_text(json.dumps(recorded, indent=2, sort_keys=True, default=str))
    plot_curves(
        metrics.history,
        out / "training_curves.png",
        fine_tune_start=metrics.fine_tune_start_epoch,
        best_epoch=metrics.best_epoch,
    )
    test = metrics.test
    if test.confusion_matrix:
        plot_confusion(np.asarray(test.confusion_matrix), labels, out / "confusion_matrix.png", test.accuracy)
    if samples is not None and config is not None and samples.train_files:
        files, names = _one_per_class(samples.train_files, samples.train_targets, labels, count=6)
        originals, draws = augmented_draws(config, files, draws=5)
        plot_augmentation(originals, draws, names, out / "augmentation.png", _augment_title(metrics))
    if samples is not None and len(samples.test_files) == len(samples.test_probabilities) > 0:
        plot_mistakes(
            samples.test_files, samples.test_probabilities, samples.test_truth, labels, out / "mistakes.png"
        )
    extra, test_warning = "", ""
    if quality is not None:
        from fovea.trainer import report_quality

        extra, test_warning = report_quality.write(out, quality, test.per_class)
    return write_index(out, metrics=metrics, labels=labels, extra_html=extra, test_warning=test_warning)


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
) -> list[tuple[str, int, float]]:
    """Loss and accuracy per epoch, train vs validation, across both phases (epochs numbered from 1).

    Returns the points drawn clipped at the top of the loss axis: (series, epoch from 1, value).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    epochs = [int(r["epoch"]) + 1 for r in history]
    clipped: list[tuple[str, int, float]] = []
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        top, log = None, False
        if key == "loss":
            values = [r[k] for r in history for k in ("loss", "val_loss") if np.isfinite(r.get(k, np.nan))]
            log = wants_log_scale(values)
            top = None if log else spike_cut(values)
        for prefix, style, name in (("", "-o", "train"), ("val_", "-s", "validation")):
            values = [r.get(prefix + key, np.nan) for r in history]
            if top is None:
                ax.plot(epochs, values, style, markersize=4, linewidth=1.6, label=name)
                continue
            shown = [min(v, top) for v in values]
            (line,) = ax.plot(epochs, shown, style, markersize=4, linewidth=1.6, label=name)
            for epoch, value in zip(epochs, values, strict=True):
                if value > top:
                    clipped.append((name, epoch, float(value)))
                    ax.plot(epoch, top, marker="^", markersize=11, color=line.get_color(), linestyle="none")
                    ax.annotate(
                        f"{value:.3g}", (epoch, top), xytext=(6, -4), textcoords="offset points",
                        fontsize=8, color=line.get_color(), va="top",
                    )  # fmt: skip
        if fine_tune_start is not None and history and fine_tune_start < len(history):
            x = fine_tune_start + 0.5
            ax.axvspan(x, epochs[-1] + 0.5, color="tab:orange", alpha=0.07, linewidth=0)
            ax.axvline(x, color="grey", linestyle="--", linewidth=1.2, label="fine-tuning starts")
        if best_epoch is not None:
            best = [r for r in history if int(r["epoch"]) + 1 == best_epoch]  # best_epoch counts from 1
            if best and "val_" + key in best[0]:
                ax.plot(
                    best_epoch, min(best[0]["val_" + key], top or np.inf), marker="*", markersize=16,
                    color="crimson", linestyle="none", label=f"restored best (epoch {best_epoch})", zorder=5,
                )  # fmt: skip
        if log:
            ax.set_yscale("log")
            title += " (log scale)"
        ax.set_title(title if top is None else f"{title} (axis cut at {top:.3g}: ▲ marks a larger value)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(0.4, epochs[-1] + 0.8)  # room for the best-epoch star at the last epoch
            ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        if key == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        elif top is not None:
            ax.set_ylim(0, top * 1.04)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Training curves (phase 1: frozen base; phase 2: fine-tuning)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return clipped


def wants_log_scale(values: Sequence[float]) -> bool:
    """A loss that spans more than LOG_RATIO (a random start, or a spike, over a well-trained end)
    reads on a log axis; a narrower one on a linear axis (cut above a lone spike, see spike_cut)."""
    positive = [v for v in values if np.isfinite(v) and v > 0]
    return bool(positive) and max(positive) / min(positive) > LOG_RATIO


def spike_cut(values: Sequence[float]) -> float | None:
    """Where to cut a loss axis so spikes do not flatten the rest, or None when nothing spikes.

    Spikes are the largest values, each SPIKE_RATIO times the next; at most a tenth of the points
    (and at least one) may be cut.
    """
    ordered = sorted((v for v in values if np.isfinite(v)), reverse=True)
    cut = 0
    while cut < max(1, len(ordered) // 10) and cut + 1 < len(ordered):
        if ordered[cut + 1] > 0 and ordered[cut] > SPIKE_RATIO * ordered[cut + 1]:
            cut += 1
        else:
            break
    return ordered[cut] * 1.15 if cut else None


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


def _augment_title(metrics: TrainMetrics) -> str:
    values = ", ".join(f"{k} {v}" for k, v in metrics.augmentation.items())
    return f"Augmentation preset '{metrics.augment}': {values}"


def _one_per_class(
    files: Sequence[str], targets: Sequence[int], labels: Sequence[str], count: int
) -> tuple[list[str], list[str]]:
    """Up to `count` training files, classes taken in turn, so every class shows."""
    by_class: dict[int, list[str]] = {}
    for f, t in zip(files, targets, strict=True):
        by_class.setdefault(int(t), []).append(f)
    picked: list[tuple[str, str]] = []
    round_ = 0
    while len(picked) < count and any(len(v) > round_ for v in by_class.values()):
        for t in sorted(by_class):
            if len(by_class[t]) > round_ and len(picked) < count:
                picked.append((by_class[t][round_], labels[t]))
        round_ += 1
    return [p[0] for p in picked], [p[1] for p in picked]


def augmented_draws(cfg: TrainConfig, files: Sequence[str], draws: int) -> tuple[np.ndarray, np.ndarray]:
    """(originals uint8 [n, H, W, 3], draws uint8 [n, draws, H, W, 3]) through the model's own
    augmentation layers, in training mode: exactly what the network sees during fit."""
    import tensorflow as tf
    from fovea.trainer.export import decode_and_resize
    from fovea.trainer.model import augmentation_layers

    size = cfg.input_size
    originals = np.stack([decode_and_resize(tf.io.read_file(f), size, size).numpy() for f in files])
    layers = augmentation_layers(cfg.augmentation(), cfg.seed)
    out = []
    for _ in range(draws):
        x = tf.constant(originals, tf.float32)
        for layer in layers:
            x = layer(x, training=True)
        out.append(np.clip(np.round(x.numpy()), 0, 255).astype(np.uint8))
    return originals, np.stack(out, axis=1)


def plot_augmentation(
    originals: np.ndarray, draws: np.ndarray, names: Sequence[str], path: str | Path, title: str
) -> None:
    """One row per training image: the image, then its augmented draws."""
    plt = _pyplot()
    rows, cols = len(originals), 1 + draws.shape[1]
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.8 * rows + 0.6), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(originals[i] if j == 0 else draws[i, j - 1])
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(names[i], fontsize=9)
            if i == 0:
                ax.set_title("original" if j == 0 else f"draw {j}", fontsize=9)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pick_mistakes(probabilities: np.ndarray, truth: np.ndarray, count: int = 16) -> tuple[list[int], int]:
    """(indices to show, how many of them are wrong): the wrong answers, most confident first, then
    the right answers the model was least sure of."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != truth)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]
    right = np.flatnonzero(predicted == truth)
    right = right[np.argsort(probabilities[right, truth[right]], kind="stable")]
    chosen = [int(i) for i in wrong[:count]]
    chosen += [int(i) for i in right[: count - len(chosen)]]
    return chosen, min(len(wrong), count)


def plot_mistakes(
    files: Sequence[str],
    probabilities: np.ndarray,
    truth: np.ndarray,
    labels: Sequence[str],
    path: str | Path,
) -> None:
    """The test images the model got wrong (or was least sure of), with truth, prediction and score."""
    from PIL import Image

    plt = _pyplot()
    chosen, num_wrong = pick_mistakes(np.asarray(probabilities), np.asarray(truth))
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen, strict=False):
        with Image.open(files[i]) as im:
            ax.imshow(np.asarray(im.convert("RGB")))
        p = int(np.argmax(probabilities[i]))
        wrong = p != int(truth[i])
        ax.set_title(
            f"true {labels[int(truth[i])]}\npred {labels[p]} {probabilities[i, p]:.2f}",
            fontsize=9, color="crimson" if wrong else "black",
        )  # fmt: skip
    if num_wrong == len(chosen):
        title = f"Test images the model got wrong ({num_wrong} shown), most confident first"
    elif num_wrong:
        title = f"{num_wrong} wrong (red), then the right answers it was least sure of"
    else:
        title = "No test image was wrong: the right answers the model was least sure of"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


_IMAGES = (
    ("training_curves.png", "Training curves"),
    ("confusion_matrix.png", "Confusion matrix"),
    ("augmentation.png", "Training images as the network sees them"),
    ("mistakes.png", "Mistakes"),
)


def write_index(
    report_dir: Path,
    *,
    metrics: TrainMetrics,
    labels: Sequence[str],
    extra_html: str = "",
    test_warning: str = "",
) -> Path:
    """report/index.html: the whole report on one page, images inlined as base64, no network."""
    e = html.escape
    test = metrics.test
    rows = "".join(
        f"<tr><td>{e(label)}</td><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td>"
        f"<td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>"
        for label, c in test.per_class.items()
    )
    best = "-" if metrics.best_epoch is None else str(metrics.best_epoch)
    counts = {split: sum(c.values()) for split, c in metrics.images.items()}
    weights = metrics.weights or (f"published version {metrics.parent}" if metrics.parent else "-")
    if metrics.parent and metrics.parent_mode:
        weights += f" ({metrics.parent_mode})"
    size = f", input {metrics.input_size}x{metrics.input_size} px" if metrics.input_size else ""
    summary = [
        ("test accuracy", f"{test.accuracy:.4f} (macro F1 {test.macro_f1:.4f}) on {test.support} images"),
        ("model", f"{metrics.backbone or '-'}{size}"),
        ("base weights", weights),
        ("classes", f"{len(labels)}: {', '.join(labels)}"),
        ("images", ", ".join(f"{k} {v}" for k, v in counts.items()) + f" ({metrics.layout})"),
        ("epochs", f"phase 1 {metrics.phase1_epochs}, phase 2 {metrics.phase2_epochs}; best epoch {best}"),
        ("best val_loss", "-" if metrics.best_val_loss is None else f"{metrics.best_val_loss:.4f}"),
        (
            "augmentation",
            f"{metrics.augment}: " + ", ".join(f"{k} {v}" for k, v in metrics.augmentation.items()),
        ),
        ("skipped files", str(len(metrics.skipped_files))),
        (
            "training time",
            f"{metrics.train_seconds:.0f} s on {metrics.replicas} replica(s) (data, both phases, test)",
        ),
    ]
    figures = "".join(
        f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,"
        f"{base64.b64encode((report_dir / name).read_bytes()).decode()}'>"
        for name, title in _IMAGES
        if (report_dir / name).is_file()
    )
    skipped = "".join(
        f"<li><code>{e(s['path'])}</code>: {e(s['reason'])}</li>" for s in metrics.skipped_files[:100]
    )
    warnings = "".join(f"<p>{e(w)}</p>" for w in metrics.warnings)
    if warnings:
        warnings = f"<div class='warning'><h2>Warning</h2>{warnings}</div>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fovea training report</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: left; }}
th {{ background: #f2f2f2; }} img {{ max-width: 100%; border: 1px solid #eee; }}
.warning {{ background: #fff3cd; border: 1px solid #e0b000; padding: 4px 14px; margin: 12px 0; }}
.leak {{ color: #a00; font-weight: 600; }}
</style></head><body>
<h1>fovea training report</h1>
{warnings}
<table>{"".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary)}</table>
<h2>Per class (test split)</h2>
{f"<p class='leak'>{e(test_warning)}</p>" if test_warning else ""}
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{rows}</table>
{gate_html(metrics.gate, test.confusion_matrix, labels) if metrics.gate is not None else ""}
{figures}
{extra_html}
{f"<h2>Skipped files</h2><ul>{skipped}</ul>" if skipped else ""}
</body></html>
"""
    path = report_dir / "index.html"
    path.write_text(page)
    return path
