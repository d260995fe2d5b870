"""What an audit found: one ``Finding`` per row of audit.csv, every image's scores, and the
``AuditResult`` that holds them (read by the command, the page and train)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.audit.checks import ClassHealth

KINDS = ("label_conflict", "label_issue", "leakage", "near_duplicate", "outlier")
"""What a finding is, in the order audit.csv lists them: a copy filed under two classes, a label
confident learning doubts, a copy in two splits, a copy within a split, an image unlike the rest."""
CSV_COLUMNS = ["kind", "score", "path", "split", "label", "suggested_label", "paired_path", "paired_split",
               "paired_label", "identical"]


@dataclass
class Finding:
    """One row of audit.csv. ``score``: the label quality of a label issue (lower is worse), the
    cosine similarity of a pair, the outlier score (higher is worse)."""

    kind: str
    path: str
    split: str
    label: str
    score: float
    suggested_label: str = ""
    paired_path: str = ""
    paired_split: str = ""
    paired_label: str = ""
    identical: bool = False
    """A pair whose files hold the same bytes."""

    def row(self) -> list[Any]:
        values = asdict(self)
        values["score"] = f"{self.score:.6f}"
        values["identical"] = "yes" if self.identical else ("no" if self.paired_path else "")
        return [values[column] for column in CSV_COLUMNS]


@dataclass
class ImageScores:
    """Every image audited, in one order, with its scores."""

    paths: list[str]
    splits: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    """Out-of-sample class probabilities."""
    label_quality: np.ndarray
    suggested: np.ndarray
    outlier_score: np.ndarray


@dataclass
class AuditResult:
    output: Path
    classes: list[str]
    findings: list[Finding]
    summary: dict[str, Any]
    """What audit.json holds."""
    health: list[ClassHealth]
    images: ImageScores
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def csv_file(self) -> Path:
        return self.output / "audit.csv"

    @property
    def json_file(self) -> Path:
        return self.output / "audit.json"

    @property
    def html_file(self) -> Path:
        return self.output / "audit.html"

    def __repr__(self) -> str:
        return f"AuditResult({str(self.output)!r}: {self.line()})"

    def to_pandas(self) -> Any:
        """One row per image audited, as scores.csv (split, label, label quality: lower is worse, the
        class the audit suggests, outlier score: higher is worse), then the kinds of finding that
        name it and every class's out-of-sample probability."""
        import pandas as pd

        kinds: dict[str, list[str]] = {}
        for finding in self.findings:
            for path in filter(None, (finding.path, finding.paired_path)):
                if finding.kind not in kinds.setdefault(path, []):
                    kinds[path].append(finding.kind)
        images = self.images
        table = pd.DataFrame({  # scores.csv's columns, then the findings
            "path": images.paths, "split": images.splits, "label": [self.classes[k] for k in images.labels],
            "label_quality": images.label_quality, "suggested_label": [self.classes[k] for k in images.suggested],
            "outlier_score": images.outlier_score, "findings": [", ".join(kinds.get(path, [])) for path in images.paths],
        })
        return table.join(pd.DataFrame(images.probabilities, columns=[f"p_{name}" for name in self.classes]))

    def _repr_html_(self) -> str:
        """Jupyter's view: the summary, each class's health and the findings in audit.csv's order."""
        from transferkit._notebook import cell, facts_table, rows_table, view

        health = [(item.name, "; ".join(item.problems) or "fine") for item in self.health]
        rows = [[finding.kind, Path(finding.path).name, finding.label, finding.suggested_label or finding.paired_label,
                 finding.score] for finding in self.findings]
        return view(self.line(), facts_table(health),
                    rows_table(["finding", "image", "label", "suggested or paired label", "score"], rows),
                    f"<p>every finding: {cell(self.csv_file)}; with thumbnails: {cell(self.html_file)}</p>")

    def of_kind(self, kind: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    def line(self) -> str:
        """The one-line summary train and the CLI print."""
        return summary_line(self.summary)


def summary_line(summary: dict[str, Any]) -> str:
    """The one-line summary of an audit.json's contents (train, the CLI and the report print it)."""
    counts = summary["counts"]
    return (
        f"audit of {summary['images']} images: {counts['label_issue']} possible label errors, "
        f"{counts['near_duplicate_pairs']} near-duplicate pairs ({counts['leakage']} across splits, "
        f"{counts['label_conflict']} across classes), {counts['outlier']} outliers"
    )
