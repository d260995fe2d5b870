"""``--frozen-lr auto --finetune-lr auto`` against the fixed default rates, side by side (issue 37).

    python benchmarks/lr_auto.py [--datasets hymenoptera,tf_flowers] [--seeds 42,1,2] [--variants fixed,auto]
                                 [--lock /tmp/heavy.lock] [--pythonpath src]

Each (dataset, seed, variant) is a whole `transferkit train DATA --seed S --no-audit --no-report
--no-progress` command in a fresh process, reading the default feature cache (warm: every run
after a dataset's first reads its features and activations from it); `auto` adds `--frozen-lr auto
--finetune-lr auto`. With `--lock`, each command holds that file's lock (flock) while it runs and
only the command is timed, not the wait. The score is the saved model's validation accuracy; the
rates a sweep found are read back from the run's config.yaml. Raw results go to
benchmarks/lr_auto.json, the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import yaml
from _results import cpu_name, row_cpu, write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "lr_auto.json"
DATASETS = HERE.parent.parent / "shared" / "datasets"
VARIANTS = {"fixed": [], "auto": ["--frozen-lr", "auto", "--finetune-lr", "auto"]}
LIMIT_S = 14 * 60
"""No run holds the shared lock longer than this (other sessions queue on it)."""


@contextlib.contextmanager
def holding(lock: str | None) -> Iterator[None]:
    if lock is None:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run(dataset: str, seed: int, variant: str, lock: str | None, pythonpath: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-c", "from transferkit.cli import command; command()", "train",
                   str(DATASETS / dataset), "--seed", str(seed), "--output", f"{work}/run", "--no-audit",
                   "--no-report", "--no-progress", *VARIANTS[variant]]
        with holding(lock):
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=LIMIT_S,
                           env={**os.environ, "PYTHONPATH": pythonpath})
            seconds = time.perf_counter() - started
        metrics = json.loads(Path(work, "run", "metrics.json").read_text())
        config = yaml.safe_load(Path(work, "run", "config.yaml").read_text())
    return {"dataset": dataset, "seed": seed, "variant": variant, "cpu": cpu_name(), "date": str(date.today()),
            "val_accuracy": metrics["val"]["accuracy"], "best_phase": metrics["best_phase"],
            "frozen_lr": config["frozen"]["lr"], "finetune_lr": config["finetune"]["lr"],
            "features": metrics.get("features"), "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = [f"Measured {max(r['date'] for r in rows)} (`python benchmarks/lr_auto.py --lock /tmp/heavy.lock`): "
             "whole `transferkit train DATA --seed S --no-audit --no-report --no-progress` commands, warm feature "
             "cache; `auto` adds `--frozen-lr auto --finetune-lr auto`. Accuracy: the saved model's, on val. "
             "Time: auto's wall time over fixed's on the same dataset, seed and CPU, then the mean of those ratios.",
             "", "| dataset | CPU | rates | seeds | val accuracy (mean) | val accuracy (per seed) | frozen rate (per seed) "
             "| fine-tuning rate (per seed) | wall time (s, mean) | x fixed (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row_cpu(row), row["variant"]), []).append(row)
    for (dataset, cpu, variant), mine in sorted(groups.items(), key=lambda item: (item[0][:2], item[0][2] != "fixed")):
        mine.sort(key=lambda r: (r["seed"] != 42, r["seed"]))
        fixed = {r["seed"]: r["seconds"] for r in groups.get((dataset, cpu, "fixed"), [])}
        ratios = [r["seconds"] / fixed[r["seed"]] for r in mine if r["seed"] in fixed]
        shown = "fixed (default)" if variant == "fixed" else "auto"
        ratio = f"{statistics.mean(ratios):.2f}" if ratios else ""
        lines.append(f"| {dataset} | {cpu} | {shown} | {','.join(str(r['seed']) for r in mine)} | "
                     f"{statistics.mean(r['val_accuracy'] for r in mine):.4f} | "
                     f"{' / '.join(format(r['val_accuracy'], '.4f') for r in mine)} | "
                     f"{' / '.join(format(r['frozen_lr'], '.2e') for r in mine)} | "
                     f"{' / '.join(format(r['finetune_lr'], '.2e') for r in mine)} | "
                     f"{statistics.mean(r['seconds'] for r in mine):.1f} | "
                     f"{ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="hymenoptera,tf_flowers")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--variants", default="fixed,auto")
    parser.add_argument("--lock", help="a file whose lock each command holds while it runs (flock)")
    parser.add_argument("--pythonpath", default=str(HERE.parent / "src"), help="the transferkit source to run")
    args = parser.parse_args()
    rows = json.loads(RAW.read_text()) if RAW.exists() else []
    for dataset in args.datasets.split(","):
        for seed in map(int, args.seeds.split(",")):
            for variant in args.variants.split(","):
                row = run(dataset, seed, variant, args.lock, args.pythonpath)
                print(row, flush=True)
                key = (dataset, seed, variant, row["cpu"])
                rows = [r for r in rows if (r["dataset"], r["seed"], r["variant"], row_cpu(r)) != key] + [row]
                RAW.write_text(json.dumps(rows, indent=1) + "\n")
                write_section("lr_auto", "Learning-rate finder against the fixed rates (issue 37)", table(rows))


if __name__ == "__main__":
    main()
