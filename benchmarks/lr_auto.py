"""``--frozen-lr auto --finetune-lr auto`` against the fixed default rates, side by side (issue 37).

    python benchmarks/lr_auto.py [--datasets hymenoptera,tf_flowers] [--seeds 42,1,2] [--variants fixed,auto]
                                 [--lock /tmp/heavy.lock] [--pythonpath src] [--missing]

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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import yaml
from _results import cpu_name, recorded, row_cpu, run_key, write_section

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
            load = os.getloadavg()[0]
            started, cpu_before = time.perf_counter(), _children_cpu()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=LIMIT_S,
                           env={**os.environ, "PYTHONPATH": pythonpath})
            seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
        metrics = json.loads(Path(work, "run", "metrics.json").read_text())
        config = yaml.safe_load(Path(work, "run", "config.yaml").read_text())
    return {"dataset": dataset, "seed": seed, "variant": variant, "cpu": cpu_name(), "date": str(date.today()),
            "val_accuracy": metrics["val"]["accuracy"], "best_phase": metrics["best_phase"],
            "frozen_lr": config["frozen"]["lr"], "finetune_lr": config["finetune"]["lr"],
            "features": metrics.get("features"), "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "load_at_start": round(load, 2)}


def _children_cpu() -> float:
    """User and system CPU seconds of the finished child processes: less moved than wall time by
    other sessions' work on the same cores."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def table(rows: list[dict]) -> str:
    lines = [f"Measured {max(r['date'] for r in rows)} (`python benchmarks/lr_auto.py --lock /tmp/heavy.lock`): "
             "whole `transferkit train DATA --seed S --no-audit --no-report --no-progress` commands, warm feature "
             "cache; `auto` adds `--frozen-lr auto --finetune-lr auto`. Accuracy: the saved model's, on val. "
             "Times: auto's wall (and CPU) time over fixed's on the same dataset, seed and CPU, then the mean of those "
             "ratios; CPU time is the command's user and system seconds, which other sessions' work on the shared "
             "cores moves less than wall time.",
             "", "| dataset | CPU | rates | seeds | val accuracy (mean) | val accuracy (per seed) | frozen rate (per seed) "
             "| fine-tuning rate (per seed) | wall time (s, mean) | wall x fixed | CPU time (s, mean) | CPU x fixed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row_cpu(row), row["variant"]), []).append(row)
    for (dataset, cpu, variant), mine in sorted(groups.items(), key=lambda item: (item[0][:2], item[0][2] != "fixed")):
        mine.sort(key=lambda r: (r["seed"] != 42, r["seed"]))
        fixed = {r["seed"]: r for r in groups.get((dataset, cpu, "fixed"), [])}
        wall, used = (_ratio(mine, fixed, key) for key in ("seconds", "cpu_seconds"))
        shown = "fixed (default)" if variant == "fixed" else "auto"
        lines.append(f"| {dataset} | {cpu} | {shown} | {','.join(str(r['seed']) for r in mine)} | "
                     f"{statistics.mean(r['val_accuracy'] for r in mine):.4f} | "
                     f"{' / '.join(format(r['val_accuracy'], '.4f') for r in mine)} | "
                     f"{' / '.join(format(r['frozen_lr'], '.2e') for r in mine)} | "
                     f"{' / '.join(format(r['finetune_lr'], '.2e') for r in mine)} | "
                     f"{statistics.mean(r['seconds'] for r in mine):.1f} | {wall} | "
                     f"{statistics.mean(r['cpu_seconds'] for r in mine):.1f} | {used} |")
    return "\n".join(lines)


def _ratio(rows: list[dict], fixed: dict[int, dict], key: str) -> str:
    """The mean over seeds of each row's ``key`` over the fixed rates' row of its seed."""
    ratios = [row[key] / fixed[row["seed"]][key] for row in rows if row["seed"] in fixed]
    return f"{statistics.mean(ratios):.2f}" if ratios else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="hymenoptera,tf_flowers")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--variants", default="fixed,auto")
    parser.add_argument("--lock", help="a file whose lock each command holds while it runs (flock)")
    parser.add_argument("--missing", action="store_true", help="skip the runs benchmarks/lr_auto.json already holds")
    parser.add_argument("--pythonpath", default=str(HERE.parent / "src"), help="the transferkit source to run")
    args = parser.parse_args()
    rows = json.loads(RAW.read_text()) if RAW.exists() else []
    done = {run_key(r) for r in rows} if args.missing else set()
    # Seed by seed, so that a measurement cut short still has every dataset and variant at the seeds it reached.
    for seed in map(int, args.seeds.split(",")):
        for dataset in args.datasets.split(","):
            for variant in args.variants.split(","):
                if (dataset, seed, variant, cpu_name()) in done:
                    continue
                row = run(dataset, seed, variant, args.lock, args.pythonpath)
                print(row, flush=True)
                rows = recorded(rows, row, RAW)
                write_section("lr_auto", "Learning-rate finder against the fixed rates (issue 37)", table(rows))


if __name__ == "__main__":
    main()
