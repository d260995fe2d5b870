"""The comparison's figures and page: every run's curves on one epoch axis, and the table."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import atomic_write, write_text
from transferkit.run.comparison import Comparison


def plot_comparison_curves(comparison: Comparison) -> Any:
    """Validation accuracy and loss of every run on one epoch axis, each run's saved epoch starred."""
    from transferkit.reporting.figures import pyplot

    figure, axes = pyplot().subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    # Runs that share a frozen phase (frozen, fine-tune) draw the same or nearly the same first
    # epochs: each run has its own marker and line style, and earlier runs larger markers, so a
    # curve under another still shows round its edges.
    markers, styles = "os^Dv<>PX*", ["-", "--", "-.", ":"]
    for number, row in enumerate(comparison.rows):
        history = comparison.run_folder(number).read_history()
        x = np.arange(1, len(history) + 1)
        saved = _saved_epoch(comparison, number, len(history))
        size = max(4.0, 9.0 - 1.2 * number)
        for axis, column in ((axes[0], "val_acc"), (axes[1], "val_loss")):
            values = [np.nan if getattr(h, column) is None else getattr(h, column) for h in history]
            (line,) = axis.plot(x, values, marker=markers[number % len(markers)], markersize=size, fillstyle="none",
                                linestyle=styles[number % len(styles)], label=row["run"], zorder=2 + number)
            if saved is not None:  # the epoch whose weights were kept
                axis.plot([saved], [values[saved - 1]], marker="*", markersize=size + 5, color=line.get_color(),
                          linestyle="none", zorder=20)
            phases = [h.phase for h in history]
            if "finetune" in phases and phases.index("finetune") > 0:
                # Where a two-phase run switches from the head to fine-tuning.
                axis.axvline(phases.index("finetune") + 0.5, color=line.get_color(), linestyle=":", linewidth=1)
    # A run from scratch starts with losses orders of magnitude above the others.
    axes[1].set_yscale("log")
    for axis, title in ((axes[0], "Validation accuracy"), (axes[1], "Validation loss (cross-entropy, log scale)")):
        axis.set_title(title)
        axis.set_xlabel("epoch (all phases; dotted: fine-tuning starts; star: the saved model)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return figure


def write_comparison_figures(comparison: Comparison) -> dict[str, Path]:
    """The curves (``plot_comparison_curves``) and a bar chart of accuracy, as PNG files."""
    from transferkit.reporting.figures import FIGURE_DPI, pyplot

    plt = pyplot()
    figure = plot_comparison_curves(comparison)
    curves = comparison.output / "curves.png"
    atomic_write(curves, lambda tmp: figure.savefig(tmp, dpi=FIGURE_DPI, format="png"))
    plt.close(figure)

    has_test = all(row["test_accuracy"] is not None for row in comparison.rows)
    key, split = ("test_accuracy", "test") if has_test else ("saved_val_accuracy", "validation")
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(comparison.rows) + 2), 4), constrained_layout=True)
    names = [row["run"] for row in comparison.rows]
    values = [row[key] for row in comparison.rows]
    bars = axis.bar(names, values, color="#2e86c1")
    for bar, value in zip(bars, values):
        axis.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.3f}", ha="center", fontsize=9)
    axis.set_ylim(0, 1.1)
    axis.set_ylabel(f"{split} accuracy")
    axis.set_title(f"{split.capitalize()} accuracy by strategy")
    axis.tick_params(axis="x", rotation=20)
    bars_path = comparison.output / "accuracy.png"
    atomic_write(bars_path, lambda tmp: figure.savefig(tmp, dpi=FIGURE_DPI, format="png"))
    plt.close(figure)
    return {"curves": curves, "accuracy": bars_path}


def _saved_epoch(comparison: Comparison, number: int, epochs: int) -> int | None:
    """The 1-based epoch on the joined axis whose weights the run kept."""
    metrics = comparison.run_folder(number).read_metrics()
    if metrics is None or metrics.best_phase not in metrics.phases:
        return None
    order = [name for name in ("frozen", "finetune") if name in metrics.phases]
    before = sum(metrics.phases[name].epochs or 0 for name in order[: order.index(metrics.best_phase)])
    epoch = before + (metrics.phases[metrics.best_phase].best_epoch or 0)
    return epoch if 1 <= epoch <= epochs else None


def write_comparison_page(
    comparison: Comparison, figures: dict[str, Path], descriptions: dict[str, str], recommended: str = "",
) -> Path:
    """``comparison.html``: the recommendation, the table, both figures embedded, and a link to each run's report."""
    from transferkit.reporting.html import Markup, html_image, html_page, html_table

    rows = []
    for number, row in enumerate(comparison.rows):
        report = comparison.run_folder(number).report_file
        link = (f'<a href="{html.escape(row["run"])}/{report.name}">{html.escape(row["run"])}</a>'
                if report.is_file() else html.escape(row["run"]))
        rows.append([
            row["strategy"], row["model"], row["best_val_accuracy"], row["saved_val_accuracy"], row["test_accuracy"],
            row["macro_f1"], row["epochs_to_best"], f"{row['wall_seconds']:.1f}", row["features_from_cache"],
            f"{row['trainable_parameters']:,} / {row['total_parameters']:,}", Markup(link),
        ])
    descriptions = "".join(
        f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>"
        for name, text in descriptions.items() if any(r["strategy"] == name for r in comparison.rows)
    )
    table = html_table(["strategy", "model", "peak val accuracy", "saved model's val accuracy", "test accuracy",
                        "macro F1", "epochs to best", "wall seconds", "features from cache",
                        "trainable / total parameters", "run"], rows)
    title = f"transferkit comparison: {comparison.output.name}"
    body = (
        f"<h1>{html.escape(title)}</h1>"
        + (f'<p class="headline" id="recommendation">{html.escape(recommended)}</p>' if recommended else "")
        + "<p>Every run used the same split, seed, epoch budget per phase and early-stopping rule.</p>"
        f"<ul>{descriptions}</ul>{table}"
        '<p class="note">Peak val accuracy is the highest point of the run\'s curve; the saved model is the '
        "epoch with the lowest validation loss (the star on the curves), whose accuracy can be lower.</p>"
        f"<h2>Validation curves</h2>{html_image(figures['curves'], 'validation curves')}"
        f"<h2>Accuracy</h2>{html_image(figures['accuracy'], 'accuracy by strategy')}"
    )
    path = comparison.output / "comparison.html"
    write_text(path, html_page(title, body))
    return path


def recommendation(comparison: Comparison) -> str:
    """The strategy to use, chosen on the saved models' validation accuracy, with the step one
    validation image makes: runs within one image of the best are tied, and the fastest wins."""
    rows = [row for row in comparison.rows if row["saved_val_accuracy"] is not None]
    if not rows:
        return "no run finished with a validation accuracy; nothing to recommend"
    images = comparison.run_folder(0).read_splits(comparison.run_folder(0).classes()).get("val", [])
    step = 1 / max(len(images), 1)
    best = max(row["saved_val_accuracy"] for row in rows)
    tied = [row for row in rows if row["saved_val_accuracy"] >= best - step - 1e-9]
    chosen = min(tied, key=lambda row: row["wall_seconds"])
    others = [row["run"] for row in tied if row is not chosen]
    line = (f"Recommended: {chosen['run']} (validation accuracy {chosen['saved_val_accuracy']:.1%}, "
            f"{chosen['wall_seconds']:.0f} s). {len(images):,} validation images resolve {100 * step:.3g}-point steps")
    if others:
        return line + f"; {', '.join(others)} came within one image of the best, so the fastest of them is recommended."
    return line + "; no other run came within one image of it."
