"""How the cached views of the training images are drawn (``--finetune-view-policy``), side by side.

    flock /tmp/heavy.lock python benchmarks/view_policies.py [--datasets hymenoptera] [--seeds 42,1,2]
                                [--variants none,light,randaugment,trivialaugment,mixup] [--cache empty|shared]

Each (dataset, seed, variant) is a whole `transferkit train` command in a fresh process. With
``--cache empty`` each has an empty feature cache of its own, so every wall time includes computing
the views; with ``--cache shared`` one cache per dataset serves every seed and variant (views do not
depend on the seed), so only a policy's first run pays for its views. Variants: none is today's
default recipe (no views); light, randaugment and trivialaugment add `--finetune-views 3` drawn by
that policy, which the default 4 fine-tuning epochs read in turn (plain, view 1, view 2, view 3);
mixup adds timm's Mixup on the cached activations (`--finetune-mixup 0.2`, manifold mixup) and no
views. CutMix needs fine-tuning on images, not the cached activations the default reads, so it is
not a variant here. Raw results go to benchmarks/view_policies.json, the table to RESULTS.md.
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


MIXUP_ALPHA = 0.2
"""Manifold mixup's usual small alpha: a 4-epoch fine-tuning has little room for a strong regulariser."""
SHARED_CACHE = Path(tempfile.gettempdir()) / "view-policies-cache"


def variant_options(variant: str) -> list[str]:
    if variant == "none":
        return []
    if variant == "mixup":
        return ["--finetune-mixup", str(MIXUP_ALPHA)]
    return ["--finetune-views", "3", "--finetune-view-policy", variant]


def run(dataset: str, seed: int, variant: str, cache: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cache_dir = f"{work}/cache" if cache == "empty" else str(SHARED_CACHE / dataset)
        command = [sys.executable, "-c", "from transferkit.cli import command; command()", "train", str(DATASETS / dataset), "--seed", str(seed),
                   "--output", f"{work}/run", "--cache-dir", cache_dir, "--no-audit", "--no-report",
                   "--no-progress", *variant_options(variant)]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
        seconds = time.perf_counter() - started
        metrics = json.loads(Path(work, "run", "metrics.json").read_text())
    return {"dataset": dataset, "seed": seed, "variant": variant, "cpu": cpu_name(), "date": str(date.today()),
            "cache": cache, "val_accuracy": metrics["val"]["accuracy"],
            "test_accuracy": (metrics.get("test") or {}).get("accuracy"), "best_phase": metrics["best_phase"], "seconds": round(seconds, 1)}


def mean_of(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.mean(values):.4f}" if len(values) == len(rows) else ""


def table(rows: list[dict]) -> str:
    lines = [(f"Measured {max(r['date'] for r in rows)} (`flock /tmp/heavy.lock python benchmarks/view_policies.py`); "
              "means over the seeds listed; wall time of the whole command (cache `empty`: views computed in every "
              "run; `shared`: one cache per dataset, a policy's views computed in its first run only)."), "",
             ("| dataset | CPU | variant | cache | seeds | val accuracy (mean) | val accuracy (per seed) "
              "| test accuracy (mean) | test accuracy (per seed) | wall time (s, mean) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row_cpu(row), row.get("cache", "empty"), row["variant"]), []).append(row)
    order = ["none", "light", "randaugment", "trivialaugment", "mixup"]
    for (dataset, cpu, cache, variant), mine in sorted(groups.items(), key=lambda item: (item[0][:3], order.index(item[0][3]))):
        shown = {"none": "no views (default)", "mixup": f"mixup {MIXUP_ALPHA}, no views"}.get(variant, f"3 views, {variant}")
        tests = " / ".join(format(r["test_accuracy"], ".4f") for r in mine if r.get("test_accuracy") is not None)
        lines.append(f"| {dataset} | {cpu} | {shown} | {cache} | {','.join(str(r['seed']) for r in mine)} | "
                     f"{mean_of(mine, 'val_accuracy')} | {' / '.join(format(r['val_accuracy'], '.4f') for r in mine)} | "
                     f"{mean_of(mine, 'test_accuracy')} | {tests} | {statistics.mean(r['seconds'] for r in mine):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="hymenoptera")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--variants", default="none,light,randaugment,trivialaugment,mixup")
    parser.add_argument("--cache", choices=("empty", "shared"), default="empty")
    args = parser.parse_args()
    rows = json.loads(RAW.read_text()) if RAW.exists() else []
    for dataset in args.datasets.split(","):
        for seed in map(int, args.seeds.split(",")):
            for variant in args.variants.split(","):
                row = run(dataset, seed, variant, args.cache)
                print(row, flush=True)
                rows = recorded(rows, row, RAW)
    write_section("view_policies", "Cached views drawn by timm's RandAugment (issue 37)", table(rows))


if __name__ == "__main__":
    main()
