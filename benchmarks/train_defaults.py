"""Train with the default recipe on hymenoptera and tf_flowers; record accuracy and wall time.

    python benchmarks/train_defaults.py [--datasets hymenoptera,tf_flowers] [--mirror ../shared/datasets]

Each dataset trains in a fresh process, timed from the command's start (imports included), the
way a user meets it. Results go to benchmarks/RESULTS.md (the table between the markers is
rewritten; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
TARGETS = {"hymenoptera": (0.95, 60.0), "tf_flowers": (0.93, 600.0)}
BEGIN, END = "<!-- train_defaults:begin -->", "<!-- train_defaults:end -->"


def run(dataset: str, mirror: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "run"
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "transferkit.cli", "train", dataset, "--data-mirror", mirror,
             "--output", str(run_dir), "--progress", "false"],
            check=True, stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - started
        metrics = json.loads((run_dir / "metrics.json").read_text())
    accuracy_target, seconds_target = TARGETS.get(dataset, (None, None))
    return {
        "dataset": dataset,
        "val_accuracy": metrics["val"]["accuracy"],
        "best_phase": metrics["best_phase"],
        "wall_seconds": wall,
        "accuracy_target": accuracy_target,
        "seconds_target": seconds_target,
    }


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"Measured {date.today()} on {platform.machine()} with {subprocess.getoutput('nproc')} cores "
        f"(`python benchmarks/train_defaults.py`).",
        "",
        "| dataset | val accuracy | target | wall time (s) | target (s) | model from phase | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        met = row["val_accuracy"] >= row["accuracy_target"] and row["wall_seconds"] <= row["seconds_target"]
        lines.append(
            f"| {row['dataset']} | {row['val_accuracy']:.4f} | {row['accuracy_target']} | "
            f"{row['wall_seconds']:.1f} | {row['seconds_target']:.0f} | {row['best_phase']} | {'yes' if met else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="hymenoptera,tf_flowers")
    parser.add_argument("--mirror", default=str(HERE.parents[1] / "shared" / "datasets"))
    args = parser.parse_args()
    rows = [run(name, args.mirror) for name in args.datasets.split(",")]
    section = f"{BEGIN}\n{table(rows)}\n{END}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n## Default recipe\n\n"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(table(rows))


if __name__ == "__main__":
    main()
