"""Honest validation (issue 34): does the carved validation split still tell the truth when the
training folder holds near-copies?

    python benchmarks/split_groups.py copies [--seed 0] [--head-only]  # cifar10_subset with altered copies
    python benchmarks/split_groups.py chest [--python-path ../main/src]
                                                                 # chest_xray_pneumonia, this checkout (and another)

``copies``: every cifar10_subset training image gets a slightly altered copy beside it (shifted
by one pixel in a seeded direction, re-encoded as JPEG at a seeded quality from 85 to 95), made
in /tmp, never in the repository. Then ``transferkit train`` with defaults and with
``--split-groups none`` (the random split). A split that keeps each copy with its original
has a validation accuracy near the official test folder's; a random one overstates it.

``chest``: the default ``train`` of chest_xray_pneumonia (validation carved from train/, the
official test/ kept), with this checkout and, with ``--python-path``, another (main before the
change). Every run trains in a fresh process with an empty feature cache, so the wall times
compare first runs.

Rows accumulate in benchmarks/split_groups.json; the table in RESULTS.md is rebuilt from them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from _results import cpu_name, write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "split_groups.json"
MIRROR = HERE.parents[1] / "shared" / "datasets"


def make_copies(source: Path, target: Path, seed: int) -> Path:
    """``source``'s train/ with an altered copy of every image beside it, and its test/ as it is."""
    rng = np.random.default_rng(seed)
    for image_path in sorted((source / "train").glob("*/*")):
        folder = target / "train" / image_path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(image_path).convert("RGB"))
        (folder / image_path.name).write_bytes(image_path.read_bytes())
        axis, step = int(rng.integers(0, 2)), int(rng.choice([-1, 1]))
        shifted = np.roll(pixels, step, axis=axis)
        buffer = io.BytesIO()
        Image.fromarray(shifted).save(buffer, format="JPEG", quality=int(rng.integers(85, 96)))
        (folder / f"{image_path.stem}_copy.jpg").write_bytes(buffer.getvalue())
    test = target / "test"
    if not test.exists():
        test.symlink_to((source / "test").resolve(), target_is_directory=True)
    return target


def train(data: str, label: str, options: list[str], python_path: str | None, cache: str | None = None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "run"
        cache = cache or str(Path(work) / "cache")
        env = {**os.environ, "TRANSFERKIT_CACHE": str(Path(work) / "cache-home")}
        if python_path:
            env["PYTHONPATH"] = python_path
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "transferkit.cli", "train", data, "--data-mirror", str(MIRROR),
             "--output", str(run_dir), "--no-progress", "--no-report", "--cache-dir", cache,
             *options],
            check=True, stdout=subprocess.DEVNULL, env=env,
        )
        wall = time.perf_counter() - started
        metrics = json.loads((run_dir / "metrics.json").read_text())
        audit = json.loads((run_dir / "audit" / "audit.json").read_text())
        with (run_dir / "audit" / "audit.csv").open(newline="") as handle:
            audit_rows = list(csv.DictReader(handle))
    calibration = metrics.get("calibration", {})
    return {
        "data": Path(data).name, "run": label, "date": str(date.today()), "cpu": cpu_name(),
        "val_accuracy": metrics["val"]["accuracy"], "test_accuracy": (metrics.get("test") or {}).get("accuracy"),
        "val_ece_before": calibration.get("ece_before"), "val_ece_after": calibration.get("ece_after"),
        "test_ece": (metrics.get("test") or {}).get("expected_calibration_error"),
        "calibration_images": calibration.get("images"),
        # the run's own audit, on the split the run used: leakage findings cross train/val/test
        "leaking_pairs": audit["counts"].get("leakage", 0),
        "identical_across": sum(row["kind"] == "leakage" and row["identical"] == "yes" for row in audit_rows),
        "near_copy_pairs_with_train": (metrics.get("leaks") or {}).get("pairs"),
        "train_seconds": metrics["train_seconds"], "wall_seconds": round(wall, 1),
    }


def table(rows: list[dict[str, object]]) -> str:
    header = ("| data | run | val acc | test acc | val - test | ECE before / after (val) | test ECE | fitted on |"
              " pairs across splits (audit: identical + near) | train s | wall s | CPU | date |")
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        gap = (r["val_accuracy"] - r["test_accuracy"]) if r["test_accuracy"] is not None else None
        lines.append(
            f"| {r['data']} | {r['run']} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {gap:+.4f} | "
            f"{r['val_ece_before']:.4f} / {r['val_ece_after']:.4f} | {r['test_ece']:.4f} | {r['calibration_images']} | "
            f"{r['identical_across']} + {r['leaking_pairs'] - r['identical_across']} | {r['train_seconds']} | {r['wall_seconds']} | {r['cpu']} | {r['date']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["copies", "chest"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the copies' shifts and JPEG qualities")
    parser.add_argument("--python-path", help="chest: also train with this checkout's src (e.g. ../main/src)")
    parser.add_argument("--python-path-label", default="main", help="the row name of --python-path's run")
    parser.add_argument("--head-only", action="store_true",
                        help="copies: --finetune-epochs 0 (the head on cached features), both runs on one feature cache")
    arguments = parser.parse_args()
    rows = json.loads(RAW.read_text()) if RAW.exists() else []
    found = []
    if arguments.experiment == "copies":
        data = make_copies(MIRROR / "cifar10_subset", Path(f"/tmp/cifar10_copies-{arguments.seed}"), arguments.seed)
        quick = ["--finetune-epochs", "0"] if arguments.head_only else []
        suffix = ", --finetune-epochs 0" if arguments.head_only else ""
        with tempfile.TemporaryDirectory() as cache:  # the second run reads the first's features
            found.append(train(str(data), f"copies: default (near-copies grouped){suffix}", quick, None, cache))
            found.append(train(str(data), f"copies: --split-groups none{suffix}", ["--split-groups", "none", *quick],
                               None, cache))
    else:
        if arguments.python_path:
            found.append(train("chest_xray_pneumonia", f"default, {arguments.python_path_label}", [],
                               arguments.python_path))
        found.append(train("chest_xray_pneumonia", "default, near-copies grouped", [], None))
    for row in found:
        print(json.dumps(row))
    keyed = {(r["data"], r["run"]): r for r in rows + found}
    RAW.write_text(json.dumps(list(keyed.values()), indent=1) + "\n")
    write_section("split_groups", "Honest validation: near-copies kept on one side of the split (issue 34)",
                  table(list(keyed.values())))


if __name__ == "__main__":
    main()
