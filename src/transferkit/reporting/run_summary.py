"""What the report shows about one run, read from its folder (evaluating its default split when
that was not done yet)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from transferkit._io import read_json
from transferkit.run.folder import RunFolder
from transferkit.run.records import EpochRecord, RunMetrics


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
    split_paths: dict[str, list[str]]
    """Every split's image paths, as splits.csv lists them."""
    rejection: dict[str, Any] | None = None
    """The model's "none of these" record (threshold, images it was fitted on), if it has one."""
    trained: str | None = None
    """The day training finished, as YYYY-MM-DD."""

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_text) or {}

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name"))


def read_run(run_dir: str | os.PathLike[str]) -> RunSummary:
    """Everything the report needs; evaluates the run's default split if not done yet."""
    from transferkit.commands.evaluate import evaluate
    from transferkit.run.folder import default_split

    folder = RunFolder(run_dir)
    classes = folder.classes()
    split_paths: dict[str, list[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for split, items in folder.read_splits(classes).items():
        counts[split] = {name: 0 for name in classes}
        split_paths[split] = [path for path, _ in items]
        for _, label in items:
            counts[split][classes[label]] += 1
    split = default_split(counts)
    if not folder.has_evaluation(split):
        evaluate(folder.root, split=split)
    evaluation, predictions = folder.read_evaluation(split)
    model_config = folder.model_dir / "config.json"
    rejection = (read_json(model_config).get("transferkit") or {}).get("unknown") if model_config.is_file() else None
    trained = (datetime.date.fromtimestamp(folder.metrics_file.stat().st_mtime).isoformat()
               if folder.metrics_file.is_file() else None)
    return RunSummary(
        run_dir=folder.root, config_text=folder.config_text(), classes=classes, counts=counts,
        skipped=folder.skipped(), history=folder.read_history(), train_metrics=folder.read_metrics(),
        split=split, evaluation=evaluation, predictions=predictions, split_paths=split_paths,
        rejection=rejection, trained=trained,
    )
