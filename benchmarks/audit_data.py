"""What `transferkit audit` finds on the real datasets (issue 18's "done means").

    python benchmarks/audit_data.py [--experiments flipped,clean,duplicates,chest,outliers,cifar10_flipped,cifar10]
                                    [--seed 0] [--mirror ../shared/datasets]

- flipped: hymenoptera, tf_flowers and chest_xray_pneumonia with 5% of the training images (seeded) filed under another
  class, chosen at random; the folder is a copy of symbolic links, so the originals stay as they
  are and the feature cache still knows every image. Recall and precision of the flipped images
  among the top 2 x (number flipped) by label quality, and among the images cleanlab flags.
- clean: the same folders unchanged: how many suspects, and the top 16 (kept in the raw results
  for a look, drawn in top16-<dataset>.jpg in the work folder).
- duplicates: tf_flowers' identical groups, and the top 20 near-copy pairs drawn side by side in
  `audit_pairs-tf_flowers.jpg` (beside this script) to be judged by eye.
- chest: chest_xray_pneumonia with validation carved out of train: the pairs across that split.
- outliers: 20 cifar10 test images (seeded) filed into hymenoptera's training class folders: how
  many are among the top 40 outlier scores.
- cifar10_flipped: the same on cifar10's 50,000 training images, where the audit fits on principal
  components; the label issues on the whole features are timed and scored beside it.
- cifar10: the whole 60,000 images with a warm feature cache (a cold pass fills it first), time
  and peak memory of the audit.
Raw results go to benchmarks/audit_data.json; the table in RESULTS.md is rebuilt from them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from _results import write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "audit_data.json"
sys.path.insert(0, str(HERE.parent / "src"))

from transferkit.audit.config import AuditConfig  # noqa: E402
from transferkit.commands.audit import audit
from transferkit._io import read_csv_rows  # noqa: E402

EXPERIMENTS = ("flipped", "clean", "duplicates", "chest", "outliers", "cifar10_flipped", "cifar10")


def config(output: Path, **options: object) -> AuditConfig:
    return AuditConfig.from_options({"output": str(output), "progress": False, **options})


def link_copy(source: Path, target: Path) -> list[Path]:
    """``target`` mirrors ``source``'s folders with a symbolic link per file; returns the links."""
    links = []
    for folder, _, files in os.walk(source):
        for name in sorted(files):
            link = target / Path(folder).relative_to(source) / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(folder, name))
            links.append(link)
    return links


def ranked_by_quality(output: Path) -> list[dict[str, str]]:
    return sorted(read_csv_rows(output / "scores.csv"), key=lambda row: float(row["label_quality"]))


def flipped(
    mirror: Path, work: Path, seed: int, datasets: tuple[str, ...] = ("hymenoptera", "tf_flowers", "chest_xray_pneumonia")
) -> list[dict[str, object]]:
    results = []
    for dataset in datasets:
        root = work / f"{dataset}-flipped"
        link_copy(mirror / dataset, root)
        train = root / "train"
        classes = sorted(p.name for p in train.iterdir())
        images = sorted(p for c in classes for p in (train / c).iterdir())
        rng = random.Random(seed)
        chosen = rng.sample(images, round(0.05 * len(images)))
        moved = {}
        for link in chosen:
            other = rng.choice([c for c in classes if c != link.parent.name])
            target = train / other / link.name
            if target.exists():
                target = train / other / f"flipped-{link.name}"
            link.rename(target)
            moved[str(target.absolute())] = {"true": link.parent.name, "given": other}
        (work / f"{dataset}-flipped.json").write_text(json.dumps(moved, indent=1))
        started = time.perf_counter()
        result = audit(root, config(work / f"audit-{dataset}-flipped"))
        seconds = time.perf_counter() - started
        cut = 2 * len(moved)
        top = [row["path"] for row in ranked_by_quality(result.output)[:cut]]
        hits = sum(path in moved for path in top)
        flagged = [f.path for f in result.of_kind("label_issue")]
        flagged_hits = sum(path in moved for path in flagged)
        results.append({
            "experiment": "flipped", "dataset": dataset, "train_images": len(images), "flipped": len(moved),
            "cut": cut, "recall_at_cut": hits / len(moved), "precision_at_cut": hits / cut,
            "flagged": len(flagged), "recall_flagged": flagged_hits / len(moved),
            "precision_flagged": flagged_hits / max(len(flagged), 1), "seconds": round(seconds, 1),
            "principal_components": result.summary["principal_components"],
            "regularisation": result.summary["regularisation"],
        })
        if result.summary["principal_components"]:
            results[-1]["whole_features"] = on_whole_features(result, moved, cut)
        print(results[-1], flush=True)
    return results


def cifar10_flipped(mirror: Path, work: Path, seed: int) -> list[dict[str, object]]:
    """cifar10's 50,000 training labels, 5% flipped: the audit runs on principal components at this
    size; the same label issues on the whole 1,280 features are timed and scored beside it."""
    return flipped(mirror, work, seed, ("cifar10",))


def on_whole_features(result: object, moved: dict[str, object], cut: int) -> dict[str, float]:
    """The 5-fold regression and cleanlab on the whole cached features of the audited images."""
    import numpy as np

    from transferkit.audit import checks
    from transferkit.config import ModelConfig
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.cache.passes import cached_pooled_features
    from transferkit.models.create import create_classifier

    images = result.images  # type: ignore[attr-defined]
    model = create_classifier(ModelConfig(), len(result.classes))  # type: ignore[attr-defined]
    features, _ = cached_pooled_features(model, images.paths, resolve_preprocessing(model), "avg", "onnx")
    started = time.perf_counter()
    fitted = checks.out_of_sample_probabilities(np.asarray(features, np.float32), images.labels, len(result.classes))  # type: ignore[attr-defined]
    issues = checks.find_label_issues(images.labels, fitted.probabilities)
    seconds = time.perf_counter() - started
    top = np.argsort(issues.quality, kind="stable")[:cut]
    hits = sum(images.paths[i] in moved for i in top)
    return {"recall_at_cut": hits / len(moved), "precision_at_cut": hits / cut, "label_issue_seconds": round(seconds, 1),
            "regularisation": fitted.regularisation}


def clean(mirror: Path, work: Path) -> list[dict[str, object]]:
    results = []
    for dataset in ("hymenoptera", "tf_flowers"):
        result = audit(mirror / dataset, config(work / f"audit-{dataset}"))
        top = [
            {"path": f.path, "label": f.label, "suggested": f.suggested_label, "quality": round(f.score, 4)}
            for f in result.of_kind("label_issue")[:16]
        ]
        contact_sheet([(f.path, f"{f.label} -> {f.suggested_label} {f.score:.3f}") for f in result.of_kind("label_issue")[:16]],
                      work / f"top16-{dataset}.jpg", size=160)
        results.append({"experiment": "clean", "dataset": dataset, "images": result.summary["images"],
                        "suspects": len(result.of_kind("label_issue")), "top16": top,
                        "noise_rate": {h.name: round(h.noise_rate, 4) for h in result.health}})
        print({k: v for k, v in results[-1].items() if k != "top16"}, flush=True)
    return results


def contact_sheet(rows: list[tuple[str, ...]], path: Path, size: int = 120) -> None:
    """Each row's images side by side with its caption (the last item) below: for a look by eye."""
    from PIL import Image, ImageDraw

    width = max(len(row) - 1 for row in rows) if rows else 1
    sheet = Image.new("RGB", (width * (size + 6), max(len(rows), 1) * (size + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (*paths, caption) in enumerate(rows):
        for column, image_path in enumerate(paths):
            with Image.open(image_path) as image:
                thumb = image.convert("RGB")
                thumb.thumbnail((size, size))
            sheet.paste(thumb, (column * (size + 6), n * (size + 16)))
        draw.text((2, n * (size + 16) + size + 2), f"{n + 1}: {caption}", fill="black")
    sheet.save(path, quality=80)


def duplicates(mirror: Path, work: Path) -> list[dict[str, object]]:
    result = audit(mirror / "tf_flowers", config(work / "audit-tf_flowers"))
    pairs = [f for f in result.findings if f.paired_path]
    identical = [f for f in pairs if f.identical]
    near = [f for f in pairs if not f.identical][:20]
    contact_sheet([(f.path, f.paired_path, f"{f.score:.3f} {f.kind}") for f in near], HERE / "audit_pairs-tf_flowers.jpg")
    entry = {
        "experiment": "duplicates", "dataset": "tf_flowers", "identical_groups": result.summary["counts"]["identical_groups"],
        "identical_pairs": [(f.path, f.paired_path, f.kind) for f in identical],
        "near_pairs": len(pairs) - len(identical),
        "top20": [(round(f.score, 4), f.kind, f.path, f.paired_path) for f in near],
        "counts": result.summary["counts"],
    }
    print({k: v for k, v in entry.items() if k != "top20"}, flush=True)
    return [entry]


def chest(mirror: Path, work: Path) -> list[dict[str, object]]:
    result = audit(mirror / "chest_xray_pneumonia", config(work / "audit-chest"))
    across = [f for f in result.of_kind("leakage") if {f.split, f.paired_split} == {"train", "val"}]
    entry = {"experiment": "chest", "dataset": "chest_xray_pneumonia", "counts": result.summary["counts"],
             "train_val_pairs": len(across), "seconds": result.summary["seconds"]}
    print(entry, flush=True)
    return [entry]


def outliers(mirror: Path, work: Path, seed: int) -> list[dict[str, object]]:
    root = work / "hymenoptera-outliers"
    link_copy(mirror / "hymenoptera", root)
    pool = sorted((mirror / "cifar10" / "test").rglob("*.*"))
    rng = random.Random(seed)
    injected = set()
    for k, path in enumerate(rng.sample(pool, 20)):
        target = root / "train" / ("ants", "bees")[k % 2] / f"cifar-{path.parent.name}-{path.name}"
        target.symlink_to(path)
        injected.add(str(target.absolute()))
    result = audit(root, config(work / "audit-outliers"))
    rows = sorted(read_csv_rows(result.output / "scores.csv"), key=lambda row: -float(row["outlier_score"]))
    top40 = sum(row["path"] in injected for row in rows[:40])
    flagged = [f.path for f in result.of_kind("outlier")]
    entry = {"experiment": "outliers", "dataset": "hymenoptera + 20 cifar10", "in_top40": top40,
             "in_top20": sum(row["path"] in injected for row in rows[:20]), "flagged": len(flagged),
             "flagged_injected": sum(path in injected for path in flagged)}
    print(entry, flush=True)
    return [entry]


def cifar10(mirror: Path, work: Path) -> list[dict[str, object]]:
    audit(mirror / "cifar10", config(work / "audit-cifar10-cold", html=False))  # fills the feature cache
    started = time.perf_counter()
    result = audit(mirror / "cifar10", config(work / "audit-cifar10"))
    entry = {"experiment": "cifar10", "dataset": "cifar10", "images": result.summary["images"],
             "seconds": round(time.perf_counter() - started, 1), "steps": result.summary["seconds"],
             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
             "counts": result.summary["counts"]}
    print(entry, flush=True)
    return [entry]


def table(entries: list[dict[str, object]]) -> str:
    lines = [f"Measured {date.today()} on {platform.machine()} with {os.cpu_count()} cores "
             "(`python benchmarks/audit_data.py`), default model and options.", ""]
    for e in entries:
        kind = e["experiment"]
        if kind == "flipped":
            lines.append(f"- {e['dataset']}, {e['flipped']} of {e['train_images']} training labels flipped: "
                         f"{e['recall_at_cut']:.1%} of them in the top {e['cut']} by label quality (precision "
                         f"{e['precision_at_cut']:.0%}); cleanlab flags {e['flagged']} images, recall "
                         f"{e['recall_flagged']:.0%}, precision {e['precision_flagged']:.0%}; audit {e['seconds']} s"
                         + (f", C={e['regularisation']:g}" if "regularisation" in e else ""))
            if e.get("whole_features"):
                whole = e["whole_features"]
                lines.append(f"  - on {e['principal_components']} principal components, as the audit runs at this size; "
                             f"on the whole features instead: {whole['recall_at_cut']:.1%} in the top {e['cut']}, "
                             f"the label issues alone {whole['label_issue_seconds']} s")
        elif kind == "clean":
            lines.append(f"- {e['dataset']} as published: {e['suspects']} label suspects among {e['images']} images")
        elif kind == "duplicates":
            lines.append(f"- {e['dataset']}: {e['identical_groups']} byte-identical groups, "
                         f"{e['near_pairs']} further near-copy pairs")
        elif kind == "chest":
            lines.append(f"- {e['dataset']}: {e['train_val_pairs']} near-copy pairs across the carved train/val split; "
                         f"{e['counts']}")
        elif kind == "outliers":
            lines.append(f"- {e['dataset']}: {e['in_top40']} of the 20 in the top 40 outlier scores "
                         f"({e['in_top20']} in the top 20); {e['flagged']} flagged, {e['flagged_injected']} of them injected"
                         + (f" ({e['note']})" if e.get("note") else ""))
        elif kind == "cifar10":
            lines.append(f"- cifar10, {e['images']} images, warm feature cache: {e['seconds']} s "
                         f"(steps {e['steps']}), peak RSS {e['peak_rss_mib']} MiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mirror", type=Path, default=HERE.parent.parent / "shared" / "datasets")
    parser.add_argument("--work", type=Path, help="folder for the copies and audits (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.experiments.split(","):
            run = globals()[name]
            needs_seed = name in ("flipped", "outliers", "cifar10_flipped")
            entries = run(args.mirror, work, args.seed) if needs_seed else run(args.mirror, work)
            keys = {(e["experiment"], e["dataset"]) for e in entries}
            raw = json.loads(RAW.read_text()) if RAW.exists() else []  # read again: another run may have added to it
            raw = [e for e in raw if (e["experiment"], e["dataset"]) not in keys] + entries
            RAW.write_text(json.dumps(raw, indent=1) + "\n")
    raw = [e for e in json.loads(RAW.read_text()) if e["experiment"] in EXPERIMENTS] if RAW.exists() else []
    order = {name: k for k, name in enumerate(EXPERIMENTS)}
    write_section("audit", "What transferkit audit finds", table(sorted(raw, key=lambda e: order[e["experiment"]])))


if __name__ == "__main__":
    main()
