"""Train with the default recipe on hymenoptera and tf_flowers; record accuracy and wall time.

    python benchmarks/train_defaults.py [--datasets hymenoptera,tf_flowers] [--seeds 42,1,2]
                                        [--mirror ../shared/datasets]

Each (dataset, seed) trains in a fresh process with empty caches, timed from the
command's start (imports included), the way a user meets it the first time. Raw results accumulate in benchmarks/train_defaults.json,
keyed by dataset and seed, so a slow dataset can be measured with fewer seeds in a separate
call; the table between the markers in benchmarks/RESULTS.md is rebuilt from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from _results import write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "train_defaults.json"
TARGETS = {"hymenoptera": (0.95, 60.0), "tf_flowers": (0.93, 600.0)}


def run(dataset: str, seed: int, mirror: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "run"
        started = time.perf_counter()
        subprocess.run(
            # Empty caches (features, ONNX exports): every run is timed as a first run on the data.
            [sys.executable, "-m", "transferkit.cli", "train", dataset, "--data-mirror", mirror,
             "--output", str(run_dir), "--seed", str(seed), "--no-progress", "--cache-dir", str(Path(work) / "cache")],
            check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TRANSFERKIT_CACHE": str(Path(work) / "cache-home")},
        )
        wall = time.perf_counter() - started
        metrics = json.loads((run_dir / "metrics.json").read_text())
    accuracy_target, seconds_target = TARGETS.get(dataset, (None, None))
    return {
        "dataset": dataset,
        "seed": seed,
        "date": str(date.today()),
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
        "| dataset | seed | val accuracy | target | wall time (s) | target (s) | model from phase | met | measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        met = row["val_accuracy"] >= row["accuracy_target"] and row["wall_seconds"] <= row["seconds_target"]
        lines.append(
            f"| {row['dataset']} | {row['seed']} | {row['val_accuracy']:.4f} | {row['accuracy_target']} | "
            f"{row['wall_seconds']:.1f} | {row['seconds_target']:.0f} | {row['best_phase']} | "
            f"{'yes' if met else 'no'} | {row['date']} |"
        )
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        mine = [row for row in rows if row["dataset"] == dataset]
        if len(mine) > 1:
            mean = sum(row["val_accuracy"] for row in mine) / len(mine)
            lines.append(f"| {dataset} | mean of {len(mine)} | {mean:.4f} | | "
                         f"{sum(row['wall_seconds'] for row in mine) / len(mine):.1f} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="hymenoptera,tf_flowers")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds, each a separate run")
    parser.add_argument("--mirror", default=str(HERE.parents[1] / "shared" / "datasets"))
    args = parser.parse_args()
    results = {(r["dataset"], r["seed"]): r for r in json.loads(RAW.read_text())} if RAW.exists() else {}
    for name in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            results[(name, seed)] = run(name, seed, args.mirror)
            RAW.write_text(json.dumps(list(results.values()), indent=1) + "\n")
    rows = sorted(results.values(), key=lambda r: (r["dataset"], r["seed"] != 42, r["seed"]))
    write_section("train_defaults", "Default recipe", table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
