"""The figures of a run's report: every plot function takes plain data and returns a matplotlib
figure whose texts are drawn as written."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.reporting.sentences import UNKNOWN_BADGE, answered_unknown

FIGURE_DPI = 110
GRID_IMAGES = 16
WRONG = "#c0392b"
RIGHT = "#1e8449"
ABSTAINED = "#555555"  # grey, as the serve page greys the bars of an image it answers "none of these"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def literal_text() -> Any:
    """Text drawn as written: matplotlib reads ``$...$`` as maths, so a class named ``US$_$x``
    (or a file name with two dollar signs) would fail the whole report."""
    return pyplot().rc_context({"text.parse_math": False})


def _literal(plot: Callable[..., Any]) -> Callable[..., Any]:
    """``plot`` builds its figure under ``literal_text``; every text in it stays literal when the
    caller draws or saves it later, outside that context."""

    @functools.wraps(plot)
    def build(*args: Any, **kwargs: Any) -> Any:
        from matplotlib.text import Text

        with literal_text():
            figure = plot(*args, **kwargs)
        if figure is not None:
            for text in figure.findobj(Text):
                text.set_parse_math(False)
        return figure

    return build



@_literal
def plot_training_curves(history: list[dict[str, Any]]) -> Any:
    """Accuracy and loss, train and validation, both phases on one epoch axis."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    epochs = np.arange(1, len(history) + 1)
    phases = [row["phase"] for row in history]

    def column(name: str) -> np.ndarray:
        return np.array([float(row[name]) if row.get(name) not in (None, "") else np.nan for row in history])

    for axis, metric, title in ((axes[0], "acc", "Accuracy"), (axes[1], "loss", "Loss (cross-entropy)")):
        axis.plot(epochs, column(f"train_{metric}"), marker="o", markersize=3, label="train")
        axis.plot(epochs, column(f"val_{metric}"), marker="o", markersize=3, label="validation")
        both = "finetune" in phases and phases.index("finetune") > 0
        if both:  # the line is explained in the axis label: a text beside it met the ticks or the curves
            axis.axvline(phases.index("finetune") + 0.5, color="grey", linestyle="--", linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("epoch (both phases; dashed line: fine-tuning starts)" if both else "epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(title.split(" ")[0].lower())
        axis.grid(alpha=0.3)
        axis.legend(loc="center right")
    return figure


@_literal
def plot_per_class_f1(metrics: dict[str, Any], split: str) -> Any:
    """Horizontal bars of every class's F1, worst at the top."""
    plt = pyplot()
    rows = [r for r in metrics["per_class"] if r["f1"] is not None]
    rows.sort(key=lambda r: r["f1"])
    height = max(2.5, 0.28 * len(rows) + 1.2)
    figure, axis = plt.subplots(figsize=(8, height), constrained_layout=True)
    values = [r["f1"] for r in rows]
    bars = axis.barh([r["class"] for r in rows], values, color="#2e86c1")
    for bar, value, row in zip(bars, values, rows):
        axis.text(min(value, 1.0) + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.2f}  (n={row['support']})",
                  va="center", fontsize=8)
    axis.set_xlim(0, 1.18)
    axis.set_xlabel("F1 score")
    axis.set_title(f"F1 per class, {split} split (macro F1 {metrics['macro_f1']:.3f})")
    axis.tick_params(axis="y", labelsize=8 if len(rows) > 30 else 10)
    return figure


@_literal
def plot_confusion_matrix(metrics: dict[str, Any], classes: list[str], split: str) -> Any:
    """Colour by row share (recall); counts written in cells while they stay legible."""
    plt = pyplot()
    counts = np.array(metrics["confusion_matrix"])
    shares = np.array(metrics["confusion_matrix_normalized"])
    n = len(classes)
    side = min(max(5.0, 0.32 * n + 2.5), 30.0)
    figure, axis = plt.subplots(figsize=(side + 1.2, side), constrained_layout=True)
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.02, label="share of the true class")
    label_size = 10 if n <= 20 else max(5, 10 - n // 20)
    axis.set_xticks(range(n), classes, rotation=90 if n > 8 else 45, ha="center" if n > 8 else "right",
                    fontsize=label_size)
    axis.set_yticks(range(n), classes, fontsize=label_size)
    if n <= 40:
        for true in range(n):
            for predicted in range(n):
                if counts[true, predicted]:
                    axis.text(predicted, true, str(counts[true, predicted]), ha="center", va="center",
                              fontsize=label_size - 1, color="white" if shares[true, predicted] > 0.5 else "black")
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(f"Confusion matrix, {split} split ({int(counts.sum())} images)")
    return figure


@_literal
def plot_reliability(metrics: dict[str, Any], split: str) -> Any:
    """Accuracy against confidence per bin, with the share of images per bin below; where the
    model is calibrated, the uncalibrated model's accuracy per bin is drawn over it, so the
    diagram shows before and after."""
    plt = pyplot()
    bins = metrics["reliability"]
    edges = np.array(bins["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    calibration = metrics.get("calibration")

    def accuracy_of(found: dict[str, Any]) -> np.ndarray:
        return np.nan_to_num(np.array([np.nan if v is None else v for v in found["accuracy"]]))

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    after = "calibrated" if calibration else "accuracy"
    top.bar(centres, accuracy_of(bins), width=width * 0.95, color="#2e86c1", edgecolor="white", label=after)
    title = f"Reliability, {split} split (ECE {metrics['expected_calibration_error']:.3f})"
    if calibration:
        before = calibration["uncalibrated_reliability"]
        top.bar(centres, accuracy_of(before), width=width * 0.95, fill=False, edgecolor="#c0392b", linewidth=1.5,
                label="before calibration")
        title = (f"Reliability, {split} split\nECE {calibration['uncalibrated_expected_calibration_error']:.3f} "
                 f"before, {metrics['expected_calibration_error']:.3f} after (T = {calibration['temperature']:.3f})")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(title)
    top.legend(loc="upper left")
    counts = np.array(bins["count"])
    bottom.bar(centres, counts / max(counts.sum(), 1), width=width * 0.95, color="#2e86c1", label=after)
    if calibration:
        before_counts = np.array(calibration["uncalibrated_reliability"]["count"])
        bottom.bar(centres, before_counts / max(before_counts.sum(), 1), width=width * 0.95, fill=False,
                   edgecolor="#c0392b", linewidth=1.5)
    bottom.set_ylabel("share of images")
    bottom.set_xlabel("confidence of the predicted class")
    bottom.set_xlim(0, 1)
    return figure


def _thumbnail(path: str, side: int) -> Any:
    from transferkit.data.images import load_image

    image = load_image(path, min_side=side)
    image.thumbnail((side, side))
    return np.asarray(image)


@_literal
def plot_image_grid(
    rows: list[dict[str, Any]], title: str, pictures: list[np.ndarray | None] | None = None, file_names: bool = False,
) -> Any:
    """Images with true and predicted labels; wrong predictions in red with a red frame.
    ``pictures``: what to draw for each row (a heat-map overlay) instead of its image file;
    ``file_names``: each caption also names its file, so a user can find and fix it."""
    plt = pyplot()
    columns = 4
    lines = max(1, -(-len(rows) // columns))
    figure, axes = plt.subplots(lines, columns, figsize=(columns * 2.7, lines * (3.3 if file_names else 3.0)), squeeze=False,
                                constrained_layout=True)
    for axis in axes.flat:
        axis.axis("off")
        # Without ticks of its own, every picture gets a set built when matplotlib places the
        # titles, though none is ever drawn.
        axis.set_xticks([])
        axis.set_yticks([])
    for n, (axis, row) in enumerate(zip(axes.flat, rows)):
        try:
            picture = pictures[n] if pictures is not None else None
            axis.imshow(picture if picture is not None else _thumbnail(row["path"], 192))
        except Exception:  # a file removed since training: keep the caption, show no picture
            axis.text(0.5, 0.5, "image unavailable", ha="center", va="center", transform=axis.transAxes)
        wrong = row["label"] != row["predicted"]
        name = f"\n{short_name(row['path'])}" if file_names else ""
        axis.set_title(
            f"true: {row['label']}\npred: {row['predicted']} ({float(row['confidence']):.0%}){name}",
            fontsize=9, color=WRONG if wrong else RIGHT,
        )
        if answered_unknown(row):  # the class above is what it would have said; a user is told "none of these"
            axis.text(0.03, 0.97, UNKNOWN_BADGE, transform=axis.transAxes, ha="left", va="top", fontsize=8,
                      color="white", bbox={"boxstyle": "round,pad=0.3", "facecolor": ABSTAINED, "edgecolor": "none"})
        if wrong:
            axis.axis("on")
            for spine in axis.spines.values():
                spine.set_edgecolor(WRONG)
                spine.set_linewidth(3)
    figure.suptitle(title)
    return figure


NAME_CHARACTERS = 28
"""A file name longer than this is shortened in the middle, to fit under a 2.7-inch picture."""


def short_name(path: str) -> str:
    # A name that is not valid UTF-8 (lone surrogates) is drawn with a replacement character: the fonts have no glyph for it.
    name = os.fsencode(Path(path).name).decode("utf-8", "replace")
    if len(name) <= NAME_CHARACTERS:
        return name
    half = (NAME_CHARACTERS - 1) // 2
    return name[:half] + "…" + name[-half:]


def sample_rows(predictions: list[dict[str, Any]], count: int = GRID_IMAGES, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded sample that shows mistakes when there are any: up to a quarter of the grid."""
    generator = np.random.default_rng(seed)
    wrong = [r for r in predictions if r["label"] != r["predicted"]]
    right = [r for r in predictions if r["label"] == r["predicted"]]
    chosen_wrong = [wrong[i] for i in generator.permutation(len(wrong))[: min(len(wrong), count // 4)]]
    chosen_right = [right[i] for i in generator.permutation(len(right))[: count - len(chosen_wrong)]]
    return chosen_right + chosen_wrong
