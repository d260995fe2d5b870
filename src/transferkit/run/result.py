"""``TrainResult``: what a finished train reports, short to read and whole in its run folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transferkit.run.folder import RunFolder
from transferkit.run.records import RunMetrics


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports; everything is also in ``run_dir``."""

    run_dir: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]
    metrics: dict[str, Any]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    best_phase: str = ""
    duplicates: dict[str, int] = dataclasses.field(default_factory=dict)
    """Counts of identical-image groups: groups, across_splits, across_classes."""
    audit: str = ""
    """The audit's one-line summary (``--audit``), else empty."""

    @property
    def model_dir(self) -> Path:
        return RunFolder(self.run_dir).model_dir

    @property
    def run_metrics(self) -> RunMetrics:
        """``metrics`` as typed records (rank zero of a multi-process run has them)."""
        return RunMetrics.from_dict(self.metrics)

    def __repr__(self) -> str:
        if not self.metrics:  # another process of a multi-process run
            return f"TrainResult({str(self.run_dir)!r}, classes {self.classes})"
        accuracy = self.run_metrics.val["accuracy"]
        return (f"TrainResult({str(self.run_dir)!r}, classes {self.classes}, "
                f"val accuracy {accuracy:.4f}, best phase {self.best_phase})")

    def to_pandas(self) -> Any:
        """history.csv: one row per epoch of every phase."""
        import pandas as pd

        return pd.DataFrame([record.as_row() for record in RunFolder(self.run_dir).read_history()])

    def _repr_html_(self) -> str:
        """Jupyter's view: the headline metrics, and the training curves where the run drew them."""
        from transferkit._notebook import facts_table, png, view

        rows = [("run folder", str(self.run_dir)), ("classes", ", ".join(self.classes))]
        if self.metrics:
            metrics = self.run_metrics
            best = metrics.phases[metrics.best_phase]
            rows += [("best phase", f"{metrics.best_phase} (epoch {best.best_epoch})"),
                     ("val accuracy", f"{metrics.val['accuracy']:.4f}"), ("val macro F1", f"{metrics.val['macro_f1']:.4f}")]
            if metrics.test is not None:
                rows += [("test accuracy", f"{metrics.test['accuracy']:.4f}")]
        curves = RunFolder(self.run_dir).figures_dir / "training_curves.png"
        return view("Training run", facts_table(rows), png(curves, "training curves"))
