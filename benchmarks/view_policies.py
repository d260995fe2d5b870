"""How the cached views of the training images are drawn (``--finetune-view-policy``), side by side.

    flock /tmp/heavy.lock python benchmarks/view_policies.py [--datasets hymenoptera] [--seeds 42,1,2]
                                                              [--variants none,light,randaugment,trivialaugment]

Each (dataset, seed, variant) is a whole `transferkit train` command in a fresh process with an
empty feature cache of its own, so every wall time includes computing the views. Variants: none is
today's default recipe (no views); the others add `--finetune-views 3` drawn by that policy, which
the default 4 fine-tuning epochs read in turn (plain, view 1, view 2, view 3). Raw results go to
benchmarks/view_policies.json, the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from _results import cpu_name, recorded, row_cpu, write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "view_policies.json"
DATASETS = HERE.parent.parent / "shared" / "datasets"


def run(dataset: str, seed: int, variant: str) -> dict:
    views = [] if variant == "none" else ["--finetune-views", "3", "--finetune-view-policy", variant]
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-c", "from transferkit.cli import command; command()", "train", str(DATASETS / dataset), "--seed", str(seed),
                   "--output", f"{work}/run", "--cache-dir", f"{work}/cache", "--no-audit", "--no-report",
                   "--no-progress", *views]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
        seconds = time.perf_counter() - started
        metrics = json.loads(Path(work, "run", "metrics.json").read_text())
    return {"dataset": dataset, "seed": seed, "variant": variant, "cpu": cpu_name(), "date": str(date.today()),
            "val_accuracy": metrics["val"]["accuracy"], "best_phase": metrics["best_phase"], "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = [f"Measured {max(r['date'] for r in rows)} (`flock /tmp/heavy.lock python benchmarks/view_policies.py`); "
             "means over the seeds listed; wall time of the whole command, views computed in it.", "",
             "| dataset | CPU | views | seeds | val accuracy (mean) | val accuracy (per seed) | wall time (s, mean) |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row_cpu(row), row["variant"]), []).append(row)
    order = ["none", "light", "randaugment", "trivialaugment"]
    for (dataset, cpu, variant), mine in sorted(groups.items(), key=lambda item: (item[0][:2], order.index(item[0][2]))):
        shown = "none (default)" if variant == "none" else f"3, {variant}"
        lines.append(f"| {dataset} | {cpu} | {shown} | {','.join(str(r['seed']) for r in mine)} | "
                     f"{statistics.mean(r['val_accuracy'] for r in mine):.4f} | "
                     f"{' / '.join(format(r['val_accuracy'], '.4f') for r in mine)} | "
                     f"{statistics.mean(r['seconds'] for r in mine):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="hymenoptera")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--variants", default="none,light,randaugment,trivialaugment")
    args = parser.parse_args()
    rows = json.loads(RAW.read_text()) if RAW.exists() else []
    for dataset in args.datasets.split(","):
        for seed in map(int, args.seeds.split(",")):
            for variant in args.variants.split(","):
                row = run(dataset, seed, variant)
                print(row, flush=True)
                rows = recorded(rows, row, RAW)
    write_section("view_policies", "Cached views drawn by timm's RandAugment (issue 37)", table(rows))


if __name__ == "__main__":
    main()
