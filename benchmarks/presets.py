"""Each quality preset on datasets x seeds: accuracy on the split issue 39 names against wall time,
the estimate said before training, and a text plot of the Pareto front.

    python benchmarks/presets.py [--datasets hymenoptera,tf_flowers] [--seeds 42,1,2]
                                 [--presets fast,balanced,best] [--cache-dir DIR] [--mirror ../shared/datasets]

Each (dataset, preset, seed) is one whole `transferkit train --preset P` command in a fresh process,
timed from its start (imports included), with the audit and the report off in every row (the same
seconds for every preset). Without --cache-dir every run starts with an empty feature cache (a
first run on the data); with it, runs share that cache and a row says how many of its images came
from there. Raw results accumulate in benchmarks/presets.json, keyed by dataset, preset, seed and
cache; the section between the markers in benchmarks/RESULTS.md is rebuilt from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from _results import cpu_name, row_cpu, write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "presets.json"
SPLIT = {"hymenoptera": "val", "tf_flowers": "val", "chest_xray_pneumonia": "test", "cifar10_subset": "test",
         "cifar10": "test"}
"""The split issue 39 judges each dataset on: the official test split where there is one."""
TARGETS = {"hymenoptera": 0.97, "tf_flowers": 0.96, "chest_xray_pneumonia": 0.90, "cifar10": 0.93}
"""Issue 39's targets for ``best`` (3-seed means)."""
SRC = HERE.parent / "src"


def estimate_seconds(console: str) -> float | None:
    """The estimate the run said before training, in seconds, as rounded as it was said."""
    found = re.search(r"estimated time: about (\d+) (s|min)", console)
    if not found:
        return None
    return float(found.group(1)) * (60 if found.group(2) == "min" else 1)


def run(dataset: str, preset: str, seed: int, mirror: str, cache_dir: str | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "run"
        cache = cache_dir or str(Path(work) / "cache")
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        if not cache_dir:  # the ONNX exports too: nothing from an earlier run
            env["TRANSFERKIT_CACHE"] = str(Path(work) / "cache-home")
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "transferkit.cli", "train", dataset, "--data-mirror", mirror, "--preset", preset,
             "--output", str(run_dir), "--seed", str(seed), "--no-progress", "--no-audit", "--no-report",
             "--cache-dir", cache],
            check=True, capture_output=True, text=True, env=env,
        )
        wall = time.perf_counter() - started
        metrics = json.loads((run_dir / "metrics.json").read_text())
    split = SPLIT.get(dataset, "test" if metrics.get("test") else "val")
    features = metrics.get("features") or {}
    return {
        "dataset": dataset, "preset": preset, "seed": seed, "date": str(date.today()), "cpu": cpu_name(),
        "cache": "shared" if cache_dir else "empty", "split": split,
        "accuracy": metrics[split]["accuracy"], "val_accuracy": metrics["val"]["accuracy"],
        "best_phase": metrics["best_phase"], "wall_seconds": round(wall, 1),
        "estimate_seconds": estimate_seconds(done.stdout),
        "forward_ms": float(found.group(1)) if (found := re.search(r"(\d+) ms an image through the backbone", done.stdout)) else None,
        "features_from_cache": features.get("from_cache"), "images": features.get("images"),
        # Where the time went, to calibrate training/estimate.py against: the feature and activation
        # pass, each phase's training, and the command's other seconds (imports, evaluation, saving).
        "feature_seconds": features.get("seconds"), "train_seconds": metrics.get("train_seconds"),
        "fit_seconds": {name: phase.get("fit_seconds") for name, phase in metrics.get("phases", {}).items()},
    }


def current_estimate(dataset: str, preset: str, mirror: str) -> float | None:
    """What the estimate line says now for ``preset`` on ``dataset``'s folder splits (rows keep the
    line their own version said, which changed while the rates were calibrated)."""
    from transferkit.config import TrainConfig
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.models.create import create_classifier
    from transferkit.training.estimate import estimate_run

    root = Path(mirror) / dataset
    counts = {split.name: sum(1 for path in split.rglob("*") if path.is_file())
              for split in sorted(root.iterdir()) if split.is_dir()} if root.is_dir() else {}
    if not counts:
        return None
    config = TrainConfig.from_options({"preset": preset})
    model = create_classifier(config.model, 2)
    return estimate_run(config, model, resolve_preprocessing(model), counts).seconds


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table(rows: list[dict], mirror: str) -> str:
    from transferkit.training.presets import PRESETS

    lines = [
        "Measured with `python benchmarks/presets.py` (whole `transferkit train --preset P` commands, audit and "
        "report off in every row; `empty`: a fresh feature cache for every run, `shared`: one cache across runs). "
        "Means over the seeds listed; x fast: wall time over `fast`'s on the same dataset, CPU and cache; estimate: "
        "what the line before training says with today's rates (each row's own line is in presets.json). "
        "Recipes (options over the defaults): "
        + "; ".join(f"`{name}`: " + (", ".join(f"{key}={value}" for key, value in options.items()) or "the defaults")
                    for name, options in PRESETS.items()) + ".",
        "",
        "| dataset | split | preset | cache | seeds | accuracy (mean) | min-max | wall time (s) | x fast | estimate (s) | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row_cpu(row), row["cache"], row["preset"]), []).append(row)
    means = {key: _mean([r["wall_seconds"] for r in mine]) for key, mine in groups.items()}
    for (dataset, cpu, cache, preset), mine in groups.items():
        accuracies = [r["accuracy"] for r in mine]
        wall, fast = means[(dataset, cpu, cache, preset)], means.get((dataset, cpu, cache, "fast"))
        estimate = current_estimate(dataset, preset, mirror)
        lines.append(
            f"| {dataset} | {mine[0]['split']} | {preset} | {cache} | {','.join(str(r['seed']) for r in mine)} | "
            f"{_mean(accuracies):.4f} | {min(accuracies):.4f}-{max(accuracies):.4f} | {wall:.1f} | "
            f"{f'{wall / fast:.2f}' if fast else ''} | {f'{estimate:.0f}' if estimate else ''} | {cpu} |"
        )
    return "\n".join(lines) + "\n\n" + plot(groups)


MARKS = {"fast": "F", "balanced": "B", "best": "X"}


def plot(groups: dict[tuple, list[dict]], width: int = 60, height: int = 14) -> str:
    """Accuracy against wall time, one text chart per dataset and cache: the Pareto front at a glance."""
    charts = []
    for dataset, cache in dict.fromkeys((key[0], key[2]) for key in groups):
        points = [(_mean([r["wall_seconds"] for r in mine]), _mean([r["accuracy"] for r in mine]), key[3])
                  for key, mine in groups.items() if key[0] == dataset and key[2] == cache]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        low, high = min(ys) - 0.002, max(ys) + 0.002
        grid = [[" "] * width for _ in range(height)]
        for x, y, name in points:
            column = round((x / max(xs)) * (width - 1))
            row = height - 1 - round((y - low) / (high - low) * (height - 1))
            grid[row][column] = MARKS.get(name, name[0].upper())
        body = [f"{high - (high - low) * k / (height - 1):.3f} |{''.join(line)}" for k, line in enumerate(grid)]
        body.append(" " * 6 + "+" + "-" * width)
        body.append(" " * 7 + f"0 s{'':>{width - 12}}{max(xs):.0f} s")
        legend = ", ".join(f"{MARKS.get(name, name[0].upper())} {name}" for _, _, name in points)
        charts.append(f"{dataset} ({cache} cache), accuracy against wall time ({legend}):\n\n```text\n"
                      + "\n".join(body) + "\n```")
    return "\n\n".join(charts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="hymenoptera")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds, each a separate run")
    parser.add_argument("--presets", default="fast,balanced,best")
    parser.add_argument("--cache-dir", help="one feature cache for every run (default: a fresh one per run)")
    parser.add_argument("--mirror", default=str(HERE.parents[1] / "shared" / "datasets"))
    parser.add_argument("--table-only", action="store_true", help="rebuild the section from presets.json, train nothing")
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    key = lambda r: (r["dataset"], r["preset"], r["seed"], r["cache"], row_cpu(r))
    results = {key(r): r for r in json.loads(RAW.read_text())} if RAW.exists() else {}
    for seed in () if args.table_only else (int(s) for s in args.seeds.split(",")):
        for name in args.datasets.split(","):
            for preset in args.presets.split(","):
                row = run(name, preset, seed, args.mirror, args.cache_dir)
                print(json.dumps(row), flush=True)
                results[key(row)] = row
                RAW.write_text(json.dumps(list(results.values()), indent=1) + "\n")
    order = {"fast": 0, "balanced": 1, "best": 2}
    rows = sorted(results.values(), key=lambda r: (r["dataset"], r["cache"], order.get(r["preset"], 9), r["seed"]))
    text = table(rows, args.mirror)
    write_section("presets", "Quality presets", text)
    print(text)


if __name__ == "__main__":
    main()
