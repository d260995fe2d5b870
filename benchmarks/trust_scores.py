"""Calibration and "none of these" on the real datasets (issue 19's "done means").

    python benchmarks/trust_scores.py [--datasets hymenoptera,tf_flowers] [--seeds 42,1,2]
                                      [--mirror ../shared/datasets]

For each dataset and seed, a model is trained with the defaults and ``--finetune-on auto`` (the
run folder is kept in benchmarks/.trust-runs and reused), so its temperature and its unknown
threshold are the ones ``train`` fits on the validation split. Then:

- calibration: the validation split's ECE (15 bins) before and after the temperature, and the
  accuracy (dividing the logits by T cannot change the top class; the table shows it did not).
  The temperature is fitted on those same images, as the issue asks; so the table also gives a
  2-fold figure: T fitted on one half of val, ECE measured on the other half, both ways, averaged.
- unknown scores: msp, energy and knn for the validation images (in distribution) and for
  images of other datasets: cifar10 test (a seeded sample of 1,000), chest_xray_pneumonia test
  (all 624), and the other flower-or-insect dataset's validation split (near distribution).
  AUROC of telling them apart, and the share of them answered unknown at the threshold that keeps
  95% of the validation images (the share of validation images kept is shown beside it).
Raw results go to benchmarks/trust_scores.json; the tables in RESULTS.md are rebuilt from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np

from _results import write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "trust_scores.json"
RUNS = HERE / ".trust-runs"
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from transferkit import TrainConfig, train  # noqa: E402
from transferkit.trust.temperature import fit_calibration, fit_temperature  # noqa: E402
from transferkit.inference.predictor import create_forward, run_forward, softmax  # noqa: E402
from transferkit.inference.metrics import expected_calibration_error, reliability_bins  # noqa: E402
from transferkit.models.create import PooledFeatures, classify_pooled
from transferkit.models.folder import load_model  # noqa: E402
from transferkit.trust.unknown import fit_threshold, unknown_scores  # noqa: E402
from transferkit.trust.records import METHODS
from transferkit.run.folder import RunFolder  # noqa: E402
from transferkit.models.folder import load_trust  # noqa: E402

NEAR = {"hymenoptera": "tf_flowers", "tf_flowers": "hymenoptera"}
KEEP = 0.95
CIFAR_SAMPLE = 1000


def image_files(root: Path, sample: int | None = None, seed: int = 0) -> list[str]:
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return sorted(random.Random(seed).sample(files, sample)) if sample and len(files) > sample else files


def trained(dataset: str, seed: int, mirror: Path) -> Path:
    run_dir = RUNS / f"{dataset}-{seed}"
    if not RunFolder(run_dir).is_finished():
        config = TrainConfig.from_options({"seed": seed, "finetune_on": "auto", "output": str(run_dir),
                                           "report": False, "progress": False})
        train(mirror / dataset, config)
    return run_dir


def ece(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    return expected_calibration_error(reliability_bins(softmax(logits / temperature), targets))


def two_fold_ece(logits: np.ndarray, targets: np.ndarray, seed: int) -> float:
    order = np.random.default_rng(seed).permutation(len(targets))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    return statistics.mean(
        ece(logits[test], targets[test], fit_temperature(logits[fit], targets[fit]))
        for fit, test in (halves, halves[::-1])
    )


def measure(dataset: str, seed: int, mirror: Path) -> dict[str, object]:
    run_dir = trained(dataset, seed, mirror)
    folder = RunFolder(run_dir)
    model, config = load_model(folder.model_dir)
    trust = load_trust(folder.model_dir, config)
    preprocessing = dict(config["transferkit"]["preprocessing"])
    preprocessing["input_size"] = tuple(preprocessing["input_size"])
    forward = create_forward(PooledFeatures(model), preprocessing["input_size"], "onnx")
    classes = json.loads(folder.classes_file.read_text())
    val = folder.read_splits(classes)["val"]
    sets = {
        "val": [path for path, _ in val],
        "cifar10": image_files(mirror / "cifar10" / "test", CIFAR_SAMPLE, seed),
        "chest_xray_pneumonia": image_files(mirror / "chest_xray_pneumonia" / "test"),
        NEAR[dataset]: image_files(mirror / NEAR[dataset] / "val"),
    }
    pooled = {name: torch.from_numpy(run_forward(forward, paths, preprocessing)) for name, paths in sets.items()}
    with torch.inference_mode():
        logits = {name: classify_pooled(model, features, 0.0).numpy() for name, features in pooled.items()}
    targets = np.array([label for _, label in val])
    temperature = trust.temperature
    fitted = fit_calibration(logits["val"], targets, "val")
    row: dict[str, object] = {
        "dataset": dataset, "seed": seed, "date": str(date.today()), "temperature": temperature,
        "val_images": len(targets), "ece_before": fitted.ece_before, "ece_after": ece(logits["val"], targets, temperature),
        "ece_two_fold": two_fold_ece(logits["val"], targets, seed),
        "accuracy_before": float((logits["val"].argmax(1) == targets).mean()),
        "accuracy_after": float((softmax(logits["val"] / temperature).argmax(1) == targets).mean()),
        "default_threshold": trust.rejection.threshold if trust.rejection else None,
        "scores": {},
    }
    for method in METHODS:
        def score(name: str) -> np.ndarray:
            calibrated = torch.from_numpy(logits[name] / temperature)
            return unknown_scores(method, calibrated, pooled[name], trust.bank).numpy()

        inside = score("val")
        threshold, kept = fit_threshold(inside, KEEP)
        found = {"val_kept": kept}
        for name in sets:
            if name == "val":
                continue
            outside = score(name)
            labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
            found[name] = {"images": len(outside), "auroc": float(roc_auc_score(labels, np.r_[inside, outside])),
                           "answered_unknown": float((outside > threshold).mean())}
        row["scores"][method] = found  # type: ignore[index]
    return row


def _mean(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def tables(rows: list[dict]) -> str:
    datasets = sorted({r["dataset"] for r in rows})
    by = {d: [r for r in rows if r["dataset"] == d] for d in datasets}
    lines = [
        f"Measured {max(r['date'] for r in rows)} on {platform.machine()} with {subprocess.getoutput('nproc')} cores "
        "(`python benchmarks/trust_scores.py`); defaults with `--finetune-on auto`; mean ± standard deviation over "
        "the seeds listed. ECE: 15 equal-width bins, on the validation split the temperature was fitted on; the "
        "2-fold column fits T on one half of val and measures the other.",
        "",
        "| model | seeds | val images | temperature | val accuracy before / after | ECE before | ECE after | ECE after, 2-fold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset, mine in by.items():
        lines.append(
            f"| {dataset} | {','.join(str(r['seed']) for r in mine)} | {mine[0]['val_images']} | "
            f"{_mean([r['temperature'] for r in mine])} | {_mean([r['accuracy_before'] for r in mine])} / "
            f"{_mean([r['accuracy_after'] for r in mine])} | {_mean([r['ece_before'] for r in mine])} | "
            f"{_mean([r['ece_after'] for r in mine])} | {_mean([r['ece_two_fold'] for r in mine])} |"
        )
    lines += [
        "",
        f"Unknown scores: AUROC of telling the model's validation images from another dataset's, and (in brackets) "
        f"the share of that dataset answered unknown at the threshold that keeps {KEEP:.0%} of the validation images. "
        "The near-distribution column (the other dataset of flowers or insects) has no target.",
        "",
        "| model | score | val kept | cifar10 test (far) | chest_xray_pneumonia test (far) | near distribution |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, mine in by.items():
        for method in METHODS:
            cells = []
            for other in ("cifar10", "chest_xray_pneumonia", NEAR[dataset]):
                found = [r["scores"][method][other] for r in mine]
                cells.append(f"{_mean([f['auroc'] for f in found])} ({_mean([f['answered_unknown'] for f in found])})")
            kept = _mean([r["scores"][method]["val_kept"] for r in mine])
            near = f"{NEAR[dataset]}: {cells[2]}"
            lines.append(f"| {dataset} | {method} | {kept} | {cells[0]} | {cells[1]} | {near} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="hymenoptera,tf_flowers")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--mirror", default=str(HERE.parents[1] / "shared" / "datasets"))
    args = parser.parse_args()
    results = {(r["dataset"], r["seed"]): r for r in json.loads(RAW.read_text())} if RAW.exists() else {}
    for dataset in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            results[(dataset, seed)] = row = measure(dataset, seed, Path(args.mirror))
            print(json.dumps(row), flush=True)
            RAW.write_text(json.dumps(list(results.values()), indent=1) + "\n")
    text = tables(list(results.values()))
    write_section("trust_scores", "Calibration and unknown scores", text)
    print(text)


if __name__ == "__main__":
    main()
