"""The self-contained HTML report of one run, or of several side by side: a headline, the
metrics, the trust records, the figures (``reporting.run_figures``), the data and the
configuration, in one file that needs no server and no other file."""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from transferkit._io import read_csv_rows, read_json, write_text
from transferkit.reporting.html import Markup, html_image, html_page, html_table
from transferkit.reporting.run_figures import grid_rows, write_figures
from transferkit.reporting.run_summary import RunSummary, read_run
from transferkit.reporting.sentences import (
    SPLIT_WORDS,
    abstention_sentence,
    answered_unknown,
    class_phrase,
    headline,
    model_name,
    reliability_sentence,
    split_used,
    threshold_note,
)
from transferkit.run.folder import RunFolder
from transferkit.run.records import PhaseRecord
from transferkit.trust.records import UNKNOWN

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
            f'{metrics.leaks["threshold"]:.2f}, or each other\'s distinctly nearest image) join train {counts}: '
            "those scores read higher than on new images. Early stopping, the best phase and the calibration "
            "left those validation images out where at least 50 others remained. "
            "The most similar pairs (every pair in leaks.csv):</p>"
            + html_table(["image", "split", "its near-copy in train", "similarity"], rows) + "</div>")


def _audit_section(run_dir: Path) -> str:
    """The audit ``train --audit`` wrote: its one-line summary, and its whole page embedded in a
    fold, so the report still shows it when mailed without the run folder."""
    from transferkit.audit.findings import summary_line

    found = RunFolder(run_dir).audit_dir / "audit.json"
    if not found.is_file():
        return ""
    line = f"Data: {html.escape(summary_line(read_json(found)))}."
    page = found.with_name("audit.html")
    if not page.is_file():
        return f'<p id="audit">{line} (audit/audit.json beside this report has them)</p>'
    embedded = html.escape(page.read_text(encoding="utf-8", errors="surrogateescape"), quote=True)
    return (f'<details id="audit"><summary>{line} Open to see the audit page.</summary>'
            f'<iframe title="data audit" srcdoc="{embedded}" style="width:100%;height:80vh;border:1px solid #ddd">'
            "</iframe></details>")


def _trust_section(run: RunSummary) -> str:
    """The temperature and the unknown threshold, as the evaluation saw them, and how many
    validation images the threshold rests on."""
    metrics = run.evaluation
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
    note, too_few = threshold_note(run.rejection)
    said = f'<p id="threshold" class="{"warning" if too_few else "note"}">{html.escape(note)}</p>' if note else ""
    return '<h3 id="trust">Calibration and "none of these"</h3>' + html_table(["", "value"], rows) + said


CAPTIONS = {
    "training_curves": "Training curves", "per_class_f1": "F1 per class", "confusion_matrix": "Confusion matrix",
    "reliability": "Reliability diagram", "sample_predictions": "Sample predictions",
    "highest_loss": "Highest-loss images",
    "highest_loss_heatmaps": "Highest-loss images: heat maps",
    "most_confused_heatmaps": "Most-confused images: heat maps",
}


def _figures_section(run: RunSummary, figures: dict[str, Path]) -> str:
    grids = grid_rows(run)
    notes = {
        "reliability": reliability_sentence(run.predictions),
        "highest_loss": "The images the model got most wrong, often a wrong label or an unusual photo; "
                        "the table below gives their files.",
    }
    for name in ("sample_predictions", "highest_loss"):
        notes[name] = " ".join(filter(None, [notes.get(name, ""), abstention_sentence(grids[name])]))
    parts = ['<h2 id="figures">Figures</h2>']
    for name, path in figures.items():
        parts.append(f'<h3 id="{name}">{CAPTIONS[name]}</h3>' + html_image(path, CAPTIONS[name], notes.get(name, "")))
        if name == "highest_loss":
            rows = [[r["path"], r["label"], r["predicted"], float(r["confidence"]),
                     UNKNOWN if answered_unknown(r) else r["predicted"]] for r in grids[name]]
            parts.append('<div id="highest_loss_files">'
                         + html_table(["file", "true class", "predicted", "confidence", "answer"], rows) + "</div>")
    return "\n".join(parts)


def _configuration_section(run: RunSummary) -> str:
    """config.yaml, with the split the run really used in place of fractions that were not."""
    config = run.config
    data = config.get("data") or {}
    if "split" in data:
        data["split"] = split_used(config, run.split_paths)
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True) if data else run.config_text
    return f'<h2 id="configuration">Configuration</h2><pre>{html.escape(text)}</pre>'


def _run_section(run: RunSummary, figures: dict[str, Path]) -> str:
    metrics = run.evaluation
    said = headline(run.classes, run.model, metrics, run.split, run.trained)
    parts = [(f'<section class="run" id="{html.escape(run.run_dir.name)}">'
              f"<h1>Image classifier: {html.escape(class_phrase(run.classes))}</h1>"),
             f'<p class="headline" id="headline">{html.escape(said)}{_inflated(run, run.split)}</p>',
             (f'<p class="muted">run folder {html.escape(run.run_dir.name)}; every figure and table below is judged '
              f"on the {SPLIT_WORDS.get(run.split, run.split)} split unless it says otherwise</p>")]
    parts.append(_audit_section(run.run_dir))
    parts.append(_leak_section(run))
    parts.append(f'<h2 id="metrics">Metrics ({run.split} split){_inflated(run, run.split)}</h2>')
    parts.append(html_table(["metric", "value"], [list(r) for r in _headline_rows(metrics)]))
    parts.append(html_table(
        ["class", "precision", "recall", "F1", "support"],
        [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in metrics["per_class"]],
    ))
    parts.append(_trust_section(run))
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
    parts.append(_figures_section(run, figures))
    parts.append(_data_section(run))
    parts.append(_configuration_section(run))
    parts.append("</section>")
    return "\n".join(parts)


def _data_section(run: RunSummary) -> str:
    splits = list(run.counts)
    parts = ['<h2 id="data">Data</h2>', html_table(
        ["class", *splits],
        [[name, *(run.counts[s].get(name, 0) for s in splits)] for name in run.classes]
        + [["all classes", *(sum(run.counts[s].values()) for s in splits)]],
    )]
    if run.skipped:
        parts.append(f"<p>{len(run.skipped)} files skipped as unreadable:</p>")
        parts.append(html_table(["file", "reason"], [[path, reason] for path, reason in run.skipped[:200]]))
    else:
        parts.append("<p>No files were skipped.</p>")
    return "\n".join(parts)


def _comparison_section(runs: list[RunSummary]) -> str:
    names = [run.run_dir.name for run in runs]
    keys = [label for label, _ in _headline_rows(runs[0].evaluation)]
    values = [dict(_headline_rows(run.evaluation)) for run in runs]
    rows = [[label, *(v.get(label) for v in values)] for label in keys]
    rows.insert(0, ["split", *(run.split for run in runs)])
    rows.append(["model", *(model_name(run.model) for run in runs)])
    rows.append(["train seconds", *(run.train_metrics and run.train_metrics.train_seconds for run in runs)])
    return '<section id="comparison"><h1>Runs side by side</h1>' + html_table(["", *names], rows) + "</section>"


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
        sections.append(_run_section(summary, write_figures(summary)))
    if len(summaries) == 1:
        title = headline(summaries[0].classes, summaries[0].model, summaries[0].evaluation, summaries[0].split, None)
    else:
        title = "transferkit report: " + ", ".join(s.run_dir.name for s in summaries)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text(output, html_page(title, "".join(sections)))
    return output


def write_report_of_run(run: Path) -> None:
    """The report at the end of a train; a failure is a warning, since the model is saved by then
    and `transferkit report` can try again."""
    try:
        write_report([run])
    except Exception as error:  # noqa: BLE001 - drawing must never cost the finished run
        logging.getLogger(__name__).warning(
            "the report could not be written (%s); the run is complete, try `transferkit report %s`", error, run)
