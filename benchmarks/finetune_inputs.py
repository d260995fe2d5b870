"""Fine-tuning on images against fine-tuning on cached boundary activations.

    python benchmarks/finetune_inputs.py [--datasets hymenoptera] [--seeds 42,1,2]
                                         [--variants images,activations,activations-strong] [--cold-only]

Each (dataset, seed, variant) is a whole `transferkit train` command in a fresh process with
empty caches (cold), then the same command again into another folder with the caches it left
(warm; skipped with --cold-only, for the datasets where one command takes half an hour). The
peak memory is the cold command's largest resident set. Every variant names its fine-tuning
epochs and blocks, so a row keeps its meaning when the defaults move. Variants (the top 3 blocks
unless named):
- images: augmented images through the whole backbone each epoch, 2 epochs (patience 2);
- images-bf16: `images` in bf16 mixed precision (`--precision bf16-mixed`), what `--precision
  auto` chooses on a CPU with AMX or AVX512-BF16;
- images-4: `images` with 4 epochs (patience 4): what the default recipe does where activations
  cannot be cached (every block unfrozen, a family without a layer sequence, over the budget);
- activations: the unfrozen top on cached activations, mirrored at random (`--finetune-augment
  light`), 2 epochs (patience 2);
- activations-strong: also shifted by up to one cell (`--finetune-augment strong`);
- activations-4: `activations` with 4 fine-tuning epochs (patience 4), the default recipe since
  2026-11-30 (below 4,000 training images since `--finetune-unfreeze auto`), in float32
  (`--precision 32-true`, the default until 2026-11-30);
- activations-4-bf16: the same in bf16 mixed precision (`--precision bf16-mixed`), what the
  default `--precision auto` chooses on a CPU with AMX or AVX512-BF16;
- activations-4-bf16-unfreeze6: `activations-4-bf16` training the top 6 blocks, not 3. Tried
  first by hand on cifar10_subset, seed 42 (`transferkit train .../cifar10_subset --seed 42
  --no-report --no-audit [--finetune-unfreeze 6 | --finetune-epochs 8 --finetune-patience 8]`):
  test 0.822 against 0.797, fine-tuning 101 against 49 s, where 8 epochs of the top 3 gave
  0.796 in 100 s. What `--finetune-unfreeze auto` trains from 4,000 training images;
- activations-views2: `activations` with two cached augmented views of each training image
  (`--finetune-views 2`: epoch e reads view e mod 3, so 2 epochs read the plain activations,
  then view 1);
- activations-views2-4: the same with 4 fine-tuning epochs (patience 4): plain, view 1, view 2, plain.
Raw results accumulate in benchmarks/finetune_inputs.json, each with the CPU it ran on; the
table in RESULTS.md is rebuilt from all of them, one row per dataset, CPU and variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from _results import UNRECORDED_CPU, cpu_name, row_cpu, write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "finetune_inputs.json"
TWO_EPOCHS = ["--finetune-epochs", "2", "--finetune-patience", "2"]
FOUR_EPOCHS = ["--finetune-epochs", "4", "--finetune-patience", "4"]
# Every variant but those named bf16 trains in float32, as all did before --precision auto.
FLOAT32 = ["--precision", "32-true"]
# And the top 3 blocks but where named, as all did before --finetune-unfreeze auto.
ON_IMAGES, ON_ACTIVATIONS = (["--finetune-on", inputs, "--finetune-unfreeze", "3"] for inputs in ("images", "activations"))
VARIANTS = {
    "images": [*ON_IMAGES, *TWO_EPOCHS, *FLOAT32],
    "images-bf16": [*ON_IMAGES, *TWO_EPOCHS, "--precision", "bf16-mixed"],
    "images-4": [*ON_IMAGES, *FOUR_EPOCHS, *FLOAT32],
    "activations": [*ON_ACTIVATIONS, *TWO_EPOCHS, *FLOAT32],
    "activations-strong": [*ON_ACTIVATIONS, "--finetune-augment", "strong", *TWO_EPOCHS, *FLOAT32],
    "activations-4": [*ON_ACTIVATIONS, *FOUR_EPOCHS, *FLOAT32],
    "activations-4-bf16": [*ON_ACTIVATIONS, *FOUR_EPOCHS, "--precision", "bf16-mixed"],
    "activations-4-bf16-unfreeze6": ["--finetune-on", "activations", "--finetune-unfreeze", "6", *FOUR_EPOCHS,
                                     "--precision", "bf16-mixed"],
    "activations-views2": [*ON_ACTIVATIONS, "--finetune-views", "2", *TWO_EPOCHS, *FLOAT32],
    "activations-views2-4": [*ON_ACTIVATIONS, "--finetune-views", "2", *FOUR_EPOCHS, *FLOAT32],
}


def timed_train(dataset: str, seed: int, variant: str, mirror: str, work: Path, name: str) -> tuple[float, Any, dict]:
    """Wall seconds, the command's resource usage (from wait4: its process and the workers it
    waited for) and its metrics."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "transferkit.cli", "train", dataset, "--data-mirror", mirror, "--output",
         str(work / name), "--seed", str(seed), "--no-progress", "--cache-dir", str(work / "cache"),
         *VARIANTS[variant]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TRANSFERKIT_CACHE": str(work / "cache-home")},
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{dataset} seed {seed} {variant}: train exited with {process.returncode}")
    seconds = time.perf_counter() - started
    return seconds, usage, json.loads((work / name / "metrics.json").read_text())


def run(dataset: str, seed: int, variant: str, mirror: str, cold_only: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cold, usage, metrics = timed_train(dataset, seed, variant, mirror, work, "cold")
        warm = None if cold_only else timed_train(dataset, seed, variant, mirror, work, "warm")[0]
    finetune = metrics["phases"].get("finetune", {})
    return {
        "dataset": dataset, "seed": seed, "variant": variant, "date": str(date.today()), "cpu": cpu_name(),
        "val_accuracy": metrics["val"]["accuracy"], "test_accuracy": metrics.get("test", {}).get("accuracy"),
        "finetune_val_accuracy": finetune.get("val", {}).get("accuracy"), "best_phase": metrics["best_phase"],
        "finetune_seconds": finetune.get("fit_seconds"), "cold_seconds": round(cold, 1),
        "warm_seconds": None if warm is None else round(warm, 1), "peak_mib": usage.ru_maxrss // 1024,
        "cold_user_seconds": round(usage.ru_utime, 1), "cold_system_seconds": round(usage.ru_stime, 1),
        "cold_minor_faults": usage.ru_minflt,
    }


def row_key(row: dict) -> tuple[str, int, str, str]:
    """A row replaces only the earlier row of its dataset, seed and variant on its CPU."""
    return row["dataset"], row["seed"], row["variant"], row_cpu(row)


def table(rows: list[dict]) -> str:
    lines = [
        f"Measured {max(r['date'] for r in rows)} on {platform.machine()} with {subprocess.getoutput('nproc')} "
        "cores (`python benchmarks/finetune_inputs.py`); means over the seeds listed.",
        "",
        "| dataset | CPU | variant | seeds | val accuracy (mean) | test accuracy (mean) | fine-tuned phase val (mean) | "
        "fine-tuning (s) | cold command (s) | warm rerun (s) | cold / warm | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row_cpu(row), row["variant"]), []).append(row)
    for (dataset, cpu, variant), mine in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1] != UNRECORDED_CPU, item[0][1], list(VARIANTS).index(item[0][2]))
    ):
        def mean(key: str, digits: int) -> str:
            values = [r[key] for r in mine if r.get(key) is not None]
            return f"{statistics.mean(values):.{digits}f}" if values else ""

        warm = [r for r in mine if r.get("warm_seconds")]
        ratio = statistics.mean(r["cold_seconds"] for r in warm) / statistics.mean(r["warm_seconds"] for r in warm) if warm else None
        lines.append(
            f"| {dataset} | {cpu} | {variant} | {','.join(str(r['seed']) for r in mine)} | {mean('val_accuracy', 4)} | "
            f"{mean('test_accuracy', 4)} | {mean('finetune_val_accuracy', 4)} | {mean('finetune_seconds', 1)} | "
            f"{mean('cold_seconds', 1)} | {mean('warm_seconds', 1)} | {'' if ratio is None else f'{ratio:.2f}'} | "
            f"{mean('peak_mib', 0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="hymenoptera")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--variants", default="images,activations,activations-strong")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm rerun")
    parser.add_argument("--mirror", default=str(HERE.parents[1] / "shared" / "datasets"))
    args = parser.parse_args()
    results = {row_key(r): r for r in json.loads(RAW.read_text())} if RAW.exists() else {}
    for dataset in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for variant in args.variants.split(","):
                row = run(dataset, seed, variant, args.mirror, args.cold_only)
                results[row_key(row)] = row
                print(row, flush=True)
                RAW.write_text(json.dumps(list(results.values()), indent=1) + "\n")
    write_section("finetune_inputs", "Fine-tuning on images or cached activations", table(list(results.values())))
    print(table(list(results.values())))


if __name__ == "__main__":
    main()
