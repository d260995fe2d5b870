"""A finished comparison's folder: one row per run, each run's own folder beside the table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.run.folder import RunFolder


@dataclass
class Comparison:
    """A finished comparison; everything is also in ``output``."""

    output: Path
    rows: list[dict[str, Any]]

    @property
    def skipped_list(self) -> Path:
        """The files every run left out, with reasons: the runs share the first run's split."""
        return self.run_folder(0).skipped_file

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every file the runs left out."""
        return self.run_folder(0).skipped()

    def run_folder(self, number: int) -> RunFolder:
        """The run folder of row ``number``."""
        return RunFolder(self.output / self.rows[number]["run"])

    def __repr__(self) -> str:
        runs = ", ".join(f"{row['strategy']} {_number(row['saved_val_accuracy'])}" for row in self.rows)
        return f"Comparison({str(self.output)!r}: val accuracy {runs})"

    def to_pandas(self) -> Any:
        """comparison.csv: one row per run."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def _repr_html_(self) -> str:
        """Jupyter's view: the table and the validation curves of every run."""
        from transferkit._notebook import png, rows_table, view

        header = ["strategy", "model", "best val acc", "saved val acc", "test acc", "macro F1", "epochs to best",
                  "wall s"]
        rows = [[row["strategy"], row["model"], row["best_val_accuracy"], row["saved_val_accuracy"],
                 row["test_accuracy"], row["macro_f1"], row["epochs_to_best"], round(row["wall_seconds"], 1)]
                for row in self.rows]
        return view(f"Comparison of {len(self.rows)} runs", rows_table(header, rows, shown=len(rows)),
                    png(self.output / "curves.png", "validation curves"))

    def table(self) -> str:
        header = ["strategy", "model", "best val acc", "test acc", "macro F1", "epochs to best", "wall s",
                  "cached features", "trainable / total params"]
        lines = [header]
        for row in self.rows:
            lines.append([
                row["strategy"], row["model"], _number(row["best_val_accuracy"]), _number(row["test_accuracy"]),
                _number(row["macro_f1"]), str(row["epochs_to_best"]), f"{row['wall_seconds']:.1f}",
                "-" if row["features_from_cache"] is None else str(row["features_from_cache"]),
                f"{row['trainable_parameters']:,} / {row['total_parameters']:,}",
            ])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
