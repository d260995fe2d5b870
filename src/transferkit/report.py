"""Figures and the self-contained HTML report of one run, or of several side by side.

Every plot function takes plain data and returns a matplotlib figure; ``write_figures`` saves
them as PNG, ``write_report`` embeds them in one HTML file that needs no server.
"""

from __future__ import annotations

import base64
import functools
import html
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import atomic_write, write_text
from transferkit.runs import EpochRecord, PhaseRecord, RunFolder, RunMetrics

FIGURE_DPI = 110
GRID_IMAGES = 16
WRONG = "#c0392b"
RIGHT = "#1e8449"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def literal_text() -> Any:
    """Text drawn as written: matplotlib reads ``$...$`` as maths, so a class named ``US$_$x``
    (or a file name with two dollar signs) would fail the whole report."""
    return _pyplot().rc_context({"text.parse_math": False})


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


# --- figures ----------------------------------------------------------------------------------


@_literal
def plot_training_curves(history: list[dict[str, Any]]) -> Any:
    """Accuracy and loss, train and validation, both phases on one epoch axis."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    epochs = np.arange(1, len(history) + 1)
    phases = [row["phase"] for row in history]

    def column(name: str) -> np.ndarray:
        return np.array([float(row[name]) if row.get(name) not in (None, "") else np.nan for row in history])

    for axis, metric, title in ((axes[0], "acc", "Accuracy"), (axes[1], "loss", "Loss (cross-entropy)")):
        axis.plot(epochs, column(f"train_{metric}"), marker="o", markersize=3, label="train")
        axis.plot(epochs, column(f"val_{metric}"), marker="o", markersize=3, label="validation")
        if "finetune" in phases and phases.index("finetune") > 0:
            start = phases.index("finetune") + 0.5
            axis.axvline(start, color="grey", linestyle="--", linewidth=1)
            axis.annotate("fine-tuning starts", (start, 0.02), xycoords=("data", "axes fraction"),
                          xytext=(4, 0), textcoords="offset points", va="bottom", fontsize=8, color="grey")
        axis.set_title(title)
        axis.set_xlabel("epoch (both phases)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(title.split(" ")[0].lower())
        axis.grid(alpha=0.3)
        axis.legend(loc="center right")
    return figure


@_literal
def plot_per_class_f1(metrics: dict[str, Any], split: str) -> Any:
    """Horizontal bars of every class's F1, worst at the top."""
    plt = _pyplot()
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
    plt = _pyplot()
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
    """Accuracy against confidence per bin, with the share of images per bin below."""
    plt = _pyplot()
    bins = metrics["reliability"]
    edges = np.array(bins["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    accuracy = np.array([np.nan if v is None else v for v in bins["accuracy"]])
    counts = np.array(bins["count"])
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    top.bar(centres, np.nan_to_num(accuracy), width=width * 0.95, color="#2e86c1", edgecolor="white", label="accuracy")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability, {split} split (ECE {metrics['expected_calibration_error']:.3f})")
    top.legend(loc="upper left")
    bottom.bar(centres, counts / max(counts.sum(), 1), width=width * 0.95, color="#7f8c8d")
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
def plot_image_grid(rows: list[dict[str, Any]], title: str) -> Any:
    """Images with true and predicted labels; wrong predictions in red with a red frame."""
    plt = _pyplot()
    columns = 4
    lines = max(1, -(-len(rows) // columns))
    figure, axes = plt.subplots(lines, columns, figsize=(columns * 2.7, lines * 3.0), squeeze=False,
                                constrained_layout=True)
    for axis in axes.flat:
        axis.axis("off")
    for axis, row in zip(axes.flat, rows):
        try:
            axis.imshow(_thumbnail(row["path"], 192))
        except Exception:  # a file removed since training: keep the caption, show no picture
            axis.text(0.5, 0.5, "image unavailable", ha="center", va="center", transform=axis.transAxes)
        wrong = row["label"] != row["predicted"]
        axis.set_title(
            f"true: {row['label']}\npred: {row['predicted']} ({float(row['confidence']):.0%})",
            fontsize=9, color=WRONG if wrong else RIGHT,
        )
        if wrong:
            axis.axis("on")
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_edgecolor(WRONG)
                spine.set_linewidth(3)
    figure.suptitle(title)
    return figure


def sample_rows(predictions: list[dict[str, Any]], count: int = GRID_IMAGES, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded sample that shows mistakes when there are any: up to a quarter of the grid."""
    generator = np.random.default_rng(seed)
    wrong = [r for r in predictions if r["label"] != r["predicted"]]
    right = [r for r in predictions if r["label"] == r["predicted"]]
    chosen_wrong = [wrong[i] for i in generator.permutation(len(wrong))[: min(len(wrong), count // 4)]]
    chosen_right = [right[i] for i in generator.permutation(len(right))[: count - len(chosen_wrong)]]
    return chosen_right + chosen_wrong


# --- run folders ------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """What the report shows about one run, read from its folder."""

    run_dir: Path
    config_text: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    skipped: list[tuple[str, str]]
    history: list[EpochRecord]
    train_metrics: RunMetrics | None
    """None for a run that has not finished training."""
    split: str
    evaluation: dict[str, Any]
    predictions: list[dict[str, Any]]


def read_run(run_dir: str | os.PathLike[str]) -> RunSummary:
    """Everything the report needs; evaluates the run's default split if not done yet."""
    from transferkit.evaluate import default_split, evaluate

    folder = RunFolder(run_dir)
    classes = folder.classes()
    counts: dict[str, dict[str, int]] = {}
    for split, items in folder.read_splits(classes).items():
        counts[split] = {name: 0 for name in classes}
        for _, label in items:
            counts[split][classes[label]] += 1
    split = default_split(counts)
    if not folder.has_evaluation(split):
        evaluate(folder.root, split=split)
    evaluation, predictions = folder.read_evaluation(split)
    return RunSummary(
        run_dir=folder.root,
        config_text=folder.config_text(),
        classes=classes,
        counts=counts,
        skipped=folder.skipped(),
        history=folder.read_history(),
        train_metrics=folder.read_metrics(),
        split=split,
        evaluation=evaluation,
        predictions=predictions,
    )


FIGURES = ("training_curves", "per_class_f1", "confusion_matrix", "reliability", "sample_predictions", "highest_loss")


def write_figures(run: RunSummary, folder: Path | None = None) -> dict[str, Path]:
    """Every figure of a run as PNG in ``folder`` (default RUN/figures); returns name -> path."""
    plt = _pyplot()
    folder = folder or RunFolder(run.run_dir).figures_dir
    folder.mkdir(parents=True, exist_ok=True)
    metrics = run.evaluation
    builders = {
        "training_curves": lambda: plot_training_curves([e.as_row() for e in run.history]) if run.history else None,
        "per_class_f1": lambda: plot_per_class_f1(metrics, run.split),
        "confusion_matrix": lambda: plot_confusion_matrix(metrics, run.classes, run.split),
        "reliability": lambda: plot_reliability(metrics, run.split),
        "sample_predictions": lambda: plot_image_grid(
            sample_rows(run.predictions), f"Sample predictions, {run.split} split"
        ),
        "highest_loss": lambda: plot_image_grid(
            metrics.get("highest_loss", [])[:GRID_IMAGES], f"Highest-loss images, {run.split} split"
        ),
    }
    written = {}
    for name in FIGURES:
        figure = builders[name]()
        if figure is None:
            continue
        path = folder / f"{name}.png"
        with literal_text():  # tick labels are laid out again when drawn
            atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=FIGURE_DPI, format="png"))
        plt.close(figure)
        written[name] = path
    return written


# --- HTML -------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th{background:#f4f6f7}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}pre{background:#f8f9f9;padding:.8rem;overflow:auto}
.run{border-top:3px solid #2e86c1;margin-top:2.5rem}.muted{color:#777}
"""

HEADLINE = [
    ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"),
    ("weighted_f1", "weighted F1"), ("log_loss", "log loss"), ("expected_calibration_error", "ECE"),
]


class Markup(str):
    """A table cell that is HTML already (a link), shown as is."""


def _format(value: Any) -> str:
    if isinstance(value, Markup):
        return value
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_format(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline_rows(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [(label, metrics.get(key)) for key, label in HEADLINE]
    rows += [(f"top-{k} accuracy", v) for k, v in metrics.get("top_k_accuracy", {}).items()]
    return rows + [("images", metrics.get("images"))]


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _phase_rows(phases: dict[str, PhaseRecord]) -> list[list[Any]]:
    rows = []
    for name, phase in phases.items():
        row = [
            "frozen features (head only)" if name == "frozen" else "fine-tuned",
            phase.epochs, phase.best_epoch,
            f"{phase.trainable_parameters or 0:,} / {phase.total_parameters or 0:,}",
            phase.best_val_loss,
        ]
        for judged in (phase.val, phase.test):
            row.append((judged or {}).get("accuracy"))
            row.append((judged or {}).get("macro_f1"))
        rows.append(row)
    return rows


def _run_section(run: RunSummary, figures: dict[str, Path], title: str) -> str:
    metrics = run.evaluation
    parts = [f'<section class="run" id="{html.escape(run.run_dir.name)}"><h1>{html.escape(title)}</h1>',
             f'<p class="muted">run folder: {html.escape(str(run.run_dir.resolve()))}; '
             f"judged on the <b>{run.split}</b> split</p>"]
    parts.append(f'<h2 id="metrics">Metrics ({run.split} split)</h2>')
    parts.append(_table(["metric", "value"], [list(r) for r in _headline_rows(metrics)]))
    parts.append(_table(
        ["class", "precision", "recall", "F1", "support"],
        [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in metrics["per_class"]],
    ))
    if metrics.get("most_confused"):
        parts.append("<h3>Most confused pairs</h3>")
        parts.append(_table(["true class", "predicted as", "images"],
                            [[r["label"], r["predicted"], r["count"]] for r in metrics["most_confused"]]))
    if run.train_metrics is not None and run.train_metrics.phases:
        parts.append('<h2 id="phases">Frozen features against fine-tuning</h2>')
        parts.append(f'<p>The saved model comes from the <b>{html.escape(run.train_metrics.best_phase)}</b> '
                     "phase (lowest validation loss).</p>")
        parts.append(_table(
            ["phase", "epochs", "best epoch", "trainable / total parameters", "best val loss",
             "val accuracy", "val macro F1", "test accuracy", "test macro F1"],
            _phase_rows(run.train_metrics.phases),
        ))
    parts.append('<h2 id="figures">Figures</h2>')
    captions = {
        "training_curves": "Training curves", "per_class_f1": "F1 per class", "confusion_matrix": "Confusion matrix",
        "reliability": "Reliability diagram", "sample_predictions": "Sample predictions",
        "highest_loss": "Highest-loss images",
    }
    for name, path in figures.items():
        parts.append(f'<h3 id="{name}">{captions[name]}</h3>' + _image(path, captions[name]))
    parts.append('<h2 id="data">Data</h2>')
    splits = list(run.counts)
    parts.append(_table(
        ["class", *splits],
        [[name, *(run.counts[s].get(name, 0) for s in splits)] for name in run.classes]
        + [["all classes", *(sum(run.counts[s].values()) for s in splits)]],
    ))
    if run.skipped:
        parts.append(f"<p>{len(run.skipped)} files skipped as unreadable:</p>")
        parts.append(_table(["file", "reason"], [[path, reason] for path, reason in run.skipped[:200]]))
    else:
        parts.append("<p>No files were skipped.</p>")
    parts.append('<h2 id="configuration">Configuration</h2>')
    parts.append(f"<pre>{html.escape(run.config_text)}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def _comparison_section(runs: list[RunSummary]) -> str:
    names = [run.run_dir.name for run in runs]
    keys = [label for label, _ in _headline_rows(runs[0].evaluation)]
    values = [dict(_headline_rows(run.evaluation)) for run in runs]
    rows = [[label, *(v.get(label) for v in values)] for label in keys]
    rows.insert(0, ["split", *(run.split for run in runs)])
    rows.append(["model", *(_model_name(run) for run in runs)])
    rows.append(["train seconds", *(run.train_metrics and run.train_metrics.train_seconds for run in runs)])
    return '<section id="comparison"><h1>Runs side by side</h1>' + _table(["", *names], rows) + "</section>"


def _model_name(run: RunSummary) -> str:
    import yaml

    return str((yaml.safe_load(run.config_text) or {}).get("model", {}).get("name"))


def write_report(runs: list[str | os.PathLike[str]], output: str | os.PathLike[str] | None = None) -> Path:
    """Write the HTML report of one run (default RUN/report.html) or several side by side."""
    summaries = [read_run(run) for run in runs]
    if output is None:
        output = RunFolder(summaries[0].run_dir).report_file if len(summaries) == 1 else Path("report.html")
    output = Path(output)
    sections = []
    if len(summaries) > 1:
        sections.append(_comparison_section(summaries))
    for summary in summaries:
        figures = write_figures(summary)
        sections.append(_run_section(summary, figures, f"Run {summary.run_dir.name}"))
    title = "transferkit report: " + ", ".join(s.run_dir.name for s in summaries)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text(output, page)
    return output
