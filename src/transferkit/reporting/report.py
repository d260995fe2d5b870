"""The self-contained HTML report of one run, or of several side by side.

The plot functions (``reporting.figures``) take plain data and return a matplotlib figure;
``write_figures`` saves them (charts as PNG, grids of photos as JPEG), ``write_report`` embeds
them in one HTML file that needs no server."""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit._io import atomic_write, read_csv_rows, read_json, write_text
from transferkit.reporting.figures import (
    FIGURE_DPI,
    GRID_IMAGES,
    literal_text,
    plot_confusion_matrix,
    plot_image_grid,
    plot_per_class_f1,
    plot_reliability,
    plot_training_curves,
    pyplot,
    sample_rows,
)
from transferkit.reporting.html import STYLE, Markup, html_image, html_table
from transferkit.run.folder import RunFolder
from transferkit.run.records import EpochRecord, PhaseRecord, RunMetrics

log = logging.getLogger(__name__)


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
    from transferkit.commands.evaluate import evaluate
    from transferkit.run.folder import default_split

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


# Grids of photos (four per run, most of the report's size): as PNG 1.7-2 MB each and 0.9 s to
# save, half of it in the PNG encoder; as JPEG 0.3 MB and 0.4 s, with no visible loss.
PHOTO_GRIDS = ("sample_predictions", "highest_loss", "highest_loss_heatmaps", "most_confused_heatmaps")


JPEG_QUALITY = 90


def write_figures(run: RunSummary, folder: Path | None = None) -> dict[str, Path]:
    """Every figure of a run in ``folder`` (default RUN/figures); returns name -> path."""
    plt = pyplot()
    run_folder = RunFolder(run.run_dir)
    folder = folder or run_folder.writable(run_folder.figures_dir)
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
    builders.update(_heatmap_builders(run))
    written = {}
    for name, build in builders.items():
        figure = build()
        if figure is None:
            continue
        photos = name in PHOTO_GRIDS
        path = folder / f"{name}.{'jpg' if photos else 'png'}"
        options = {"format": "jpeg", "pil_kwargs": {"quality": JPEG_QUALITY}} if photos else {"format": "png"}
        with literal_text():  # tick labels are laid out again when drawn
            _lay_out_once(figure)
            atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=FIGURE_DPI, **options))
        if photos:  # a folder drawn before grids were JPEG keeps no stale PNG of the grid
            path.with_suffix(".png").unlink(missing_ok=True)
        plt.close(figure)
        written[name] = path
    return written


def most_confused_rows(run: RunSummary, count: int = GRID_IMAGES) -> list[dict[str, Any]]:
    """The images behind the most-confused pairs table, pair by pair, most confident first."""
    rows: list[dict[str, Any]] = []
    for pair in run.evaluation.get("most_confused", []):
        found = [r for r in run.predictions if (r["label"], r["predicted"]) == (pair["label"], pair["predicted"])]
        rows += sorted(found, key=lambda r: -float(r["confidence"]))
    return rows[:count]


def _lay_out_once(figure: Any) -> None:
    """Place the axes now, at the saved resolution, and keep them there. With its layout engine
    still set, ``savefig`` draws the whole figure twice, once only to lay it out, and a grid's
    sixteen pictures are resampled each time; the file comes out the same."""
    figure.set_dpi(FIGURE_DPI)
    engine = figure.get_layout_engine()
    if engine is not None:
        engine.execute(figure)
        # None alone installs whatever engine a matplotlibrc asks for (``figure.autolayout``),
        # which would lay the figure out again, or refuse to, next to a colorbar.
        with pyplot().rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
            figure.set_layout_engine(None)


def _heatmap_builders(run: RunSummary) -> dict[str, Callable[[], Any]]:
    """Heat-map versions of the highest-loss and most-confused grids: where the model found the
    label it predicted. Only with grad-cam installed; none for a grid with no images."""
    from transferkit.reporting.explain import (
        ExplainUnavailable,
        grad_cam_available,
        heat_overlay,
        load_explainer,
    )

    if not grad_cam_available():
        return {}
    grids = {
        "highest_loss_heatmaps": (run.evaluation.get("highest_loss", [])[:GRID_IMAGES], "Highest-loss images"),
        "most_confused_heatmaps": (most_confused_rows(run), "Most-confused images"),
    }
    explainers: list[Any] = []  # loaded once, by the first grid drawn
    # The most-confused images are mostly among the highest-loss ones: each is explained once
    # (a backward pass per image is most of these grids' cost, a few seconds of every train).
    explained: dict[str, Any] = {}

    def build(rows: list[dict[str, Any]], title: str) -> Any:
        if not explainers:
            try:
                explainers.append(load_explainer(run.run_dir))
            except ExplainUnavailable as error:  # a backbone without a map to hook: the report goes on without
                log.info("no heat-map grids in the report: %s", error)
                explainers.append(None)
        if explainers[0] is None:
            return None
        missing = [r["path"] for r in rows if r["path"] not in explained]
        for e in explainers[0].explain(missing, unreadable={}):
            explained[e.path] = heat_overlay(e.image, e.heatmap)
        return plot_image_grid(rows, f"{title}, {run.split} split: where the model found its prediction "
                                     f"(red; {explainers[0].method})", [explained.get(r["path"]) for r in rows])

    return {name: (lambda rows=rows, title=title: build(rows, title)) for name, (rows, title) in grids.items() if rows}


HEADLINE = [
    ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"),
    ("weighted_f1", "weighted F1"), ("log_loss", "log loss"), ("expected_calibration_error", "ECE"),
]


def _headline_rows(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [(label, metrics.get(key)) for key, label in HEADLINE]
    rows += [(f"top-{k} accuracy", v) for k, v in metrics.get("top_k_accuracy", {}).items()]
    return rows + [("images", metrics.get("images"))]


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


def _audit_link(run_dir: Path) -> str:
    """The audit ``train --audit`` wrote, in one line with a link, where there is one."""
    from transferkit.audit.findings import summary_line

    page = RunFolder(run_dir).audit_dir / "audit.html"
    found = page.with_name("audit.json")
    if not found.is_file():
        return ""
    link = f'<a href="{html.escape(page.resolve().as_uri())}">audit.html</a>' if page.is_file() else "audit.json"
    return f'<p id="audit">Data: {html.escape(summary_line(read_json(found)))} (see {link}).</p>'


SHOWN_LEAKS = 8


def _inflated(run: RunSummary, split: str) -> str:
    pairs = run.train_metrics.inflated(split) if run.train_metrics is not None else 0
    return f' <span class="inflated">inflated: {pairs:,} near-copy pairs with train</span>' if pairs else ""


def _leak_section(run: RunSummary) -> str:
    """A warning that near-copies of training images lift the val or test score, with the worst pairs."""
    from transferkit.audit.page import Thumbnails

    metrics = run.train_metrics
    if metrics is None or not (metrics.leaks or {}).get("pairs"):
        return ""
    leaks = read_csv_rows(RunFolder(run.run_dir).leaks_file)
    counts = " and ".join(f"{count:,} to {split}" for split, count in metrics.leaks["pairs"].items())
    thumbs = Thumbnails()
    rows = [[Markup(thumbs.img(row["path"], alt=row["split"])), row["split"],
             Markup(thumbs.img(row["paired_path"], alt="train")), float(row["similarity"])]
            for row in leaks[:SHOWN_LEAKS]]
    return (f'<div id="leaks"><p class="inflated">Near-copy pairs (cosine similarity &ge; '
            f'{metrics.leaks["threshold"]:.2f}) join train {counts}: those scores read higher than on new images, and '
            "the best phase was chosen on them. The most similar pairs (every pair in leaks.csv):</p>"
            + html_table(["image", "split", "its near-copy in train", "similarity"], rows) + "</div>")


def _trust_section(metrics: dict[str, Any]) -> str:
    """The temperature and the unknown threshold, as the evaluation saw them."""
    calibration, unknown = metrics.get("calibration"), metrics.get("unknown")
    if not calibration and not unknown:
        return ""
    rows: list[list[Any]] = []
    if calibration:
        rows += [["temperature (fitted on " + calibration["fitted_on"] + ")", calibration["temperature"]],
                 ["ECE before calibration", calibration["uncalibrated_expected_calibration_error"]],
                 ["ECE after calibration", metrics["expected_calibration_error"]]]
    if unknown:
        rows += [[f"unknown score ({unknown['method']}) threshold", unknown["threshold"]],
                 ["images answered unknown", f"{unknown['unknown']} of {unknown['images']}"]]
    return '<h3 id="trust">Calibration and "none of these"</h3>' + html_table(["", "value"], rows)


def _run_section(run: RunSummary, figures: dict[str, Path], title: str) -> str:
    metrics = run.evaluation
    parts = [f'<section class="run" id="{html.escape(run.run_dir.name)}"><h1>{html.escape(title)}</h1>',
             f'<p class="muted">run folder: {html.escape(str(run.run_dir.resolve()))}; '
             f"judged on the <b>{run.split}</b> split</p>"]
    parts.append(_audit_link(run.run_dir))
    parts.append(_leak_section(run))
    parts.append(f'<h2 id="metrics">Metrics ({run.split} split){_inflated(run, run.split)}</h2>')
    parts.append(html_table(["metric", "value"], [list(r) for r in _headline_rows(metrics)]))
    parts.append(html_table(
        ["class", "precision", "recall", "F1", "support"],
        [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in metrics["per_class"]],
    ))
    parts.append(_trust_section(metrics))
    if metrics.get("most_confused"):
        parts.append("<h3>Most confused pairs</h3>")
        parts.append(html_table(["true class", "predicted as", "images"],
                            [[r["label"], r["predicted"], r["count"]] for r in metrics["most_confused"]]))
    if run.train_metrics is not None and run.train_metrics.phases:
        parts.append('<h2 id="phases">Frozen features against fine-tuning</h2>')
        parts.append(f'<p>The saved model comes from the <b>{html.escape(run.train_metrics.best_phase)}</b> '
                     "phase (lowest validation loss).</p>")
        parts.append(html_table(
            ["phase", "epochs", "best epoch", "trainable / total parameters", "best val loss",
             "val accuracy", "val macro F1", "test accuracy", "test macro F1"],
            _phase_rows(run.train_metrics.phases),
        ))
    parts.append('<h2 id="figures">Figures</h2>')
    captions = {
        "training_curves": "Training curves", "per_class_f1": "F1 per class", "confusion_matrix": "Confusion matrix",
        "reliability": "Reliability diagram", "sample_predictions": "Sample predictions",
        "highest_loss": "Highest-loss images",
        "highest_loss_heatmaps": "Highest-loss images: heat maps",
        "most_confused_heatmaps": "Most-confused images: heat maps",
    }
    for name, path in figures.items():
        parts.append(f'<h3 id="{name}">{captions[name]}</h3>' + html_image(path, captions[name]))
    parts.append('<h2 id="data">Data</h2>')
    splits = list(run.counts)
    parts.append(html_table(
        ["class", *splits],
        [[name, *(run.counts[s].get(name, 0) for s in splits)] for name in run.classes]
        + [["all classes", *(sum(run.counts[s].values()) for s in splits)]],
    ))
    if run.skipped:
        parts.append(f"<p>{len(run.skipped)} files skipped as unreadable:</p>")
        parts.append(html_table(["file", "reason"], [[path, reason] for path, reason in run.skipped[:200]]))
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
    return '<section id="comparison"><h1>Runs side by side</h1>' + html_table(["", *names], rows) + "</section>"


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
