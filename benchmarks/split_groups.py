"""Honest validation (issue 34): does the carved validation split still tell the truth when the
training folder holds near-copies?

    python benchmarks/split_groups.py copies [--seed 0] [--train-seed 42] [--head-only] [--cache-dir DIR]
                                                                 # cifar10_subset with altered copies
    python benchmarks/split_groups.py chest [--python-path ../main/src | --head-only] [--train-seed 42]
                                                                 # chest_xray_pneumonia, this checkout (and another)
    python benchmarks/split_groups.py similarity [--cache-dir DIR]  # what tells a copy from a neighbour
    python benchmarks/split_groups.py thumbnail-cost [--data tf_flowers]  # the thumbnails' cost, cold

``copies``: every cifar10_subset training image gets a slightly altered copy beside it (shifted
by one pixel in a seeded direction, re-encoded as JPEG at a seeded quality from 85 to 95), made
in /tmp, never in the repository. Then ``transferkit train`` with defaults and with
``--split-groups none`` (the random split). A split that keeps each copy with its original
has a validation accuracy near the official test folder's; a random one overstates it.

``chest``: the default ``train`` of chest_xray_pneumonia (validation carved from train/, the
official test/ kept), with this checkout and, with ``--python-path``, another (main before the
change); with ``--head-only``, this checkout's grouped split against ``--split-groups none``, the
head alone on one feature cache. Every run trains in a fresh process with an empty feature cache, so the wall times
compare first runs.

``similarity``: the cosine similarity of every true copy pair (known by construction) against
every image's nearest non-copy, and how many images the split's near-copy rule (``data.groups``:
the threshold, or 1 to 3 nearest that stand apart) and each candidate of ``RULES`` join on
cifar10_subset with copies and on the real folders (hymenoptera, tf_flowers,
chest_xray_pneumonia, cifar10_subset as published), where few are copies; the split's rule is the
features' pairs with the grey thumbnails' (``data.thumbnails``), against the features' alone (before).

``thumbnail-cost``: on an empty cache, the feature pass (which keeps each image's thumbnail from its
decode), the thumbnails read back, a pass of the thumbnails' own (what a cache filled before they
were kept costs once) and the thumbnails' own arithmetic per image.

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


def copies_across(run_dir: Path) -> int | None:
    """Altered copies whose original is in another split, read from the run's splits.csv: every
    copy is known by its name, whatever the similarity search found."""
    with (run_dir / "splits.csv").open(newline="") as handle:
        split_of = {row["path"]: row["split"] for row in csv.DictReader(handle)}
    copies = [path for path in split_of if path.endswith("_copy.jpg")]
    if not copies:
        return None
    return sum(split_of[path] != split_of.get(path[: -len("_copy.jpg")] + ".jpg") for path in copies)


def train(data: str, label: str, options: list[str], python_path: str | None, cache: str | None = None,
          seed: int = 42) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "run"
        cache = cache or str(Path(work) / "cache")
        env = {**os.environ, "TRANSFERKIT_CACHE": str(Path(work) / "cache-home")}
        if python_path:
            env["PYTHONPATH"] = python_path
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "transferkit.cli", "train", data, "--data-mirror", str(MIRROR),
             "--output", str(run_dir), "--no-progress", "--no-report", "--cache-dir", cache, "--seed", str(seed),
             *options],
            check=True, stdout=subprocess.DEVNULL, env=env,
        )
        wall = time.perf_counter() - started
        metrics = json.loads((run_dir / "metrics.json").read_text())
        audit = json.loads((run_dir / "audit" / "audit.json").read_text())
        with (run_dir / "audit" / "audit.csv").open(newline="") as handle:
            audit_rows = list(csv.DictReader(handle))
        across = copies_across(run_dir)
    calibration = metrics.get("calibration", {})
    return {
        "data": Path(data).name, "run": label, "seed": seed, "date": str(date.today()), "cpu": cpu_name(),
        "val_accuracy": metrics["val"]["accuracy"], "test_accuracy": (metrics.get("test") or {}).get("accuracy"),
        "val_ece_before": calibration.get("ece_before"), "val_ece_after": calibration.get("ece_after"),
        "test_ece": (metrics.get("test") or {}).get("expected_calibration_error"),
        "calibration_images": calibration.get("images"),
        # the run's own audit, on the split the run used: leakage findings cross train/val/test
        "leaking_pairs": audit["counts"].get("leakage", 0),
        "identical_across": sum(row["kind"] == "leakage" and row["identical"] == "yes" for row in audit_rows),
        "near_copy_pairs_with_train": (metrics.get("leaks") or {}).get("pairs"),
        "copy_pairs_across": across,
        "train_seconds": metrics["train_seconds"], "wall_seconds": round(wall, 1),
    }


def table(rows: list[dict[str, object]]) -> str:
    header = ("| data | run | seed | val acc | test acc | val - test | ECE before / after (val) | test ECE | fitted on |"
              " pairs across splits (audit: identical + near) | copies across (by name) | train s | wall s | CPU | date |")
    lines = [header, "|" + "---|" * 15]
    for r in rows:
        gap = (r["val_accuracy"] - r["test_accuracy"]) if r["test_accuracy"] is not None else None
        across = r.get("copy_pairs_across")
        lines.append(
            f"| {r['data']} | {r['run']} | {r.get('seed', 42)} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {gap:+.4f} | "
            f"{r['val_ece_before']:.4f} / {r['val_ece_after']:.4f} | {r['test_ece']:.4f} | {r['calibration_images']} | "
            f"{r['identical_across']} + {r['leaking_pairs'] - r['identical_across']} | {'' if across is None else across} | "
            f"{r['train_seconds']} | {r['wall_seconds']} | {r['cpu']} | {r['date']} |"
        )
    return "\n".join(lines)


def pooled_features(root: Path, cache: str | None) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, dict]:
    """Every image's pooled features and thumbnail with the default model, as train computes them
    before its split, and how long each took."""
    from transferkit.cache.passes import cached_pooled_features, cached_thumbnails
    from transferkit.cache.store import FeatureCache
    from transferkit.config import ModelConfig
    from transferkit.data.folders import discover
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.models.create import create_classifier

    index = discover(root)
    paths = [path for items in index.splits.values() for path, _ in items]
    labels = np.array([label for items in index.splits.values() for _, label in items])
    model = create_classifier(ModelConfig(), len(index.classes))
    preprocessing = resolve_preprocessing(model)
    features, feature_stats = cached_pooled_features(model, paths, preprocessing, "avg", "onnx", cache, 2, False)
    folder = FeatureCache.for_backbone(model, preprocessing, "avg", cache).folder
    thumbnails, thumbnail_stats = cached_thumbnails(paths, preprocessing, folder, 2)
    stats = {"features": feature_stats.as_dict(), "thumbnails": thumbnail_stats.as_dict()}
    return np.asarray(features, dtype=np.float32), paths, labels, thumbnails, stats


RULES = {
    "each other's distinct nearest, ratio 0.6 (the audit)": ("nearest", 0.6),
    "each other's distinct nearest, ratio 0.8 (the split before)": ("nearest", 0.8),
    "each other's nearest, any ratio": ("nearest", 1.0),
    "1 nearest apart, ratio 0.8": ("cluster", 0.8, 1),
    "1 to 3 nearest apart, ratio 0.8 (the split)": ("cluster", 0.8, 3),
    "1 to 3 nearest apart, ratio 0.85": ("cluster", 0.85, 3),
    "1 to 3 nearest apart, ratio 0.9": ("cluster", 0.9, 3),
}
"""Candidate rules for the split's near-copies, each with the 0.95 threshold's pairs: ``nearest`` is
the audit's rule at that distance ratio, ``cluster`` the split's ``distinct_cluster_pairs``."""

THUMBNAIL_RULES = {f"split's features + thumbnails at {floor} alike, ratio {ratio}": (floor, ratio)
                   for floor, ratio in ((0.9, 0.5), (0.9, 0.6), (0.9, 0.7), (0.95, 0.6), (0.8, 0.6))}
"""Candidate thumbnail rules (``data.thumbnails.thumbnail_pairs``' floor and ratio), each joined to
the split's features' pairs."""


def rule_pairs(similarities: np.ndarray, neighbours: np.ndarray, rule: tuple) -> list[tuple[int, int]]:
    from transferkit.audit.checks import DISTINCT_RATIO, near_duplicate_pairs
    from transferkit.audit.config import DUPLICATE_THRESHOLD
    from transferkit.data.groups import distinct_cluster_pairs

    # the cluster rule's pairs hold the audit's, as near_copy_pairs joins them
    ratio = rule[1] if rule[0] == "nearest" else DISTINCT_RATIO
    pairs = {(i, j) for i, j, _ in near_duplicate_pairs(similarities, neighbours, DUPLICATE_THRESHOLD, ratio)}
    if rule[0] == "cluster":
        pairs |= {(i, j) for i, j, _ in distinct_cluster_pairs(similarities, neighbours, rule[1], rule[2])}
    return sorted(pairs)


def similarity(data: str, root: Path, cache: str | None) -> dict[str, object]:
    """The copy pairs' similarities against the nearest non-copies, and what the split's near-copy
    rule (and each of ``RULES``) joins."""
    from transferkit.audit.checks import nearest_neighbours
    from transferkit.audit.config import DUPLICATE_THRESHOLD
    from transferkit.data.groups import NEIGHBOURS, connected_groups, near_copy_pairs
    from transferkit.data.thumbnails import thumbnail_pairs

    features, paths, labels, thumbnails, stats = pooled_features(root, cache)
    row = {path: i for i, path in enumerate(paths)}
    partner = np.full(len(paths), -1)
    for i, path in enumerate(paths):
        if path.endswith("_copy.jpg"):
            original = row[path[: -len("_copy.jpg")] + ".jpg"]
            partner[i], partner[original] = original, i
    similarities, neighbours = nearest_neighbours(features, NEIGHBOURS)
    # each image's most similar neighbour that is not its own copy (or original)
    others = np.where(neighbours == partner[:, None], -np.inf, similarities).max(axis=1)
    copies = np.flatnonzero(partner > np.arange(len(paths)))

    def joins(pairs: list[tuple[int, int]]) -> dict[str, int]:
        group = connected_groups(len(paths), pairs)
        sizes = np.bincount(group)
        found = int((group[copies] == group[partner[copies]]).sum())
        # the copies grouped count as found, not as non-copies joined
        return {"copies_grouped": found, "images_grouped": int((sizes[group] > 1).sum()) - 2 * found,
                "largest_group": int(sizes.max()), "cross_class_pairs": sum(int(labels[i] != labels[j]) for i, j in pairs)}

    pairs, _ = near_copy_pairs(features, DUPLICATE_THRESHOLD)
    feature_edges = [(i, j) for i, j, _ in pairs]
    started = time.perf_counter()
    thumbnail_edges = [(i, j) for i, j, _ in thumbnail_pairs(thumbnails)]
    search_seconds = time.perf_counter() - started
    result: dict[str, object] = {
        "data": data, "images": len(paths), "date": str(date.today()), "cpu": cpu_name(), **stats,
        "thumbnail_search_seconds": round(search_seconds, 2),
        "nearest_other": {f"p{q}": round(float(np.percentile(others, q)), 4) for q in (50, 99, 99.9, 100)},
        "pairs": len(pairs), "pairs_from_threshold": sum(s >= DUPLICATE_THRESHOLD for _, _, s in pairs),
        "thumbnail_pairs": len(thumbnail_edges),
        "thumbnail_pairs_new": len(set(thumbnail_edges) - set(feature_edges)),
        **joins(feature_edges + thumbnail_edges),
        "features_alone": joins(feature_edges),
        "rules": {name: joins(rule_pairs(similarities, neighbours, rule)) for name, rule in RULES.items()},
    }
    for name, (floor, ratio) in THUMBNAIL_RULES.items():
        result["rules"][name] = joins(feature_edges + [(i, j) for i, j, _ in thumbnail_pairs(thumbnails, floor, ratio)])
    if len(copies):
        unit = features / np.linalg.norm(features, axis=1, keepdims=True)
        copy_similarity = (unit[copies] * unit[partner[copies]]).sum(axis=1)
        result["copies"] = len(copies)
        result["copy_similarity"] = {f"p{q}": round(float(np.percentile(copy_similarity, q)), 4) for q in (0, 1, 5, 50)}
        result["copies_from_threshold"] = int((copy_similarity >= DUPLICATE_THRESHOLD).sum())
        centred = thumbnails - thumbnails.mean(axis=1, keepdims=True)
        centred /= np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
        copy_thumbnail = (centred[copies] * centred[partner[copies]]).sum(axis=1)
        result["copy_thumbnail_similarity"] = {f"p{q}": round(float(np.percentile(copy_thumbnail, q)), 4)
                                               for q in (0, 1, 5, 50)}
    else:
        for found in (result, result["features_alone"], *result["rules"].values()):
            del found["copies_grouped"]
    return result


def similarity_table(rows: list[dict[str, object]]) -> str:
    header = ("| data | images | copy pairs: similarity min / p1 / p5 / median | copies >= 0.95 |"
              " copy thumbnails: similarity min / p1 / p5 / median | copies grouped (features alone) |"
              " nearest non-copy: median / p99 / p99.9 / max | feature pairs | of them >= 0.95 |"
              " thumbnail pairs (not among the features') | cross-class |"
              " non-copy images grouped (features alone) | largest group (features alone) |"
              " features s (from cache) | thumbnails s (from cache) | CPU | date |")
    lines = [header, "|" + "---|" * 17]

    def quartet(values: dict | None) -> str:
        return " / ".join(f"{values[k]:.3f}" for k in ("p0", "p1", "p5", "p50")) if values else "no copies"

    for r in rows:
        other = " / ".join(f"{r['nearest_other'][k]:.3f}" for k in ("p50", "p99", "p99.9", "p100"))
        alone = r.get("features_alone", {})
        grouped = (f"{r['copies_grouped']} / {r['copies']} ({alone.get('copies_grouped')})" if "copies" in r else "")
        share = f"{r['images_grouped']} ({r['images_grouped'] / r['images']:.1%})"
        if alone:
            share += f" ({alone['images_grouped']}, {alone['images_grouped'] / r['images']:.1%})"
        seconds = "".join(f" | {r[kind]['seconds']} ({r[kind]['from_cache']})" if kind in r else " | "
                          for kind in ("features", "thumbnails"))
        lines.append(
            f"| {r['data']} | {r['images']} | {quartet(r.get('copy_similarity'))} | {r.get('copies_from_threshold', '')} | "
            f"{quartet(r.get('copy_thumbnail_similarity')) if 'copies' in r else ''} | {grouped} | {other} | "
            f"{r['pairs']} | {r['pairs_from_threshold']} | "
            f"{r.get('thumbnail_pairs', '')} ({r.get('thumbnail_pairs_new', '')}) | {r['cross_class_pairs']} | {share} | "
            f"{r['largest_group']} ({alone.get('largest_group', '')}){seconds} | {r['cpu']} | {r['date']} |"
        )
    # each candidate rule: copies joined, then per folder the non-copy images grouped and the largest group
    lines += ["", ("Candidate rules for the split (each with the 0.95 threshold's pairs): copies joined of "
                   f"{rows[0].get('copies', 0)}, then per folder non-copy images grouped (share), largest group, "
                   "cross-class pairs."), "",
              "| rule | " + " | ".join(r["data"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for name in rows[0].get("rules", {}):
        cells = []
        for r in rows:
            found = r["rules"][name]
            copied = f"{found['copies_grouped']} / {r['copies']} copies; " if "copies" in r else ""
            cells.append(f"{copied}{found['images_grouped']} ({found['images_grouped'] / r['images']:.1%}), "
                         f"largest {found['largest_group']}, {found['cross_class_pairs']} cross-class")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def thumbnail_cost(data: str) -> dict[str, object]:
    """On an empty cache: the feature pass keeping thumbnails, the thumbnails read back, a pass of
    their own into another empty cache, and ``thumbnail`` alone on 300 decoded images."""
    from transferkit.cache.passes import cached_pooled_features, cached_thumbnails
    from transferkit.cache.store import FeatureCache
    from transferkit.config import ModelConfig
    from transferkit.data.folders import discover
    from transferkit.data.images import read_image, resize_side
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.data.thumbnails import thumbnail
    from transferkit.models.create import create_classifier

    index = discover(MIRROR / data)
    paths = [path for items in index.splits.values() for path, _ in items]
    model = create_classifier(ModelConfig(), len(index.classes))
    preprocessing = resolve_preprocessing(model)
    result: dict[str, object] = {"data": data, "images": len(paths), "date": str(date.today()), "cpu": cpu_name()}
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        result["feature_pass"] = cached_pooled_features(model, paths, preprocessing, "avg", "onnx", first, 2)[1].as_dict()
        features_folder = FeatureCache.for_backbone(model, preprocessing, "avg", first).folder
        result["thumbnails_after_it"] = cached_thumbnails(paths, preprocessing, features_folder, 2)[1].as_dict()
        result["thumbnail_pass"] = cached_thumbnails(paths, preprocessing, Path(second), 2)[1].as_dict()
    decoded = [read_image(path, resize_side(preprocessing))[0] for path in paths[:300]]
    started = time.perf_counter()
    for image in decoded:
        thumbnail(image)
    result["thumbnail_ms_per_image"] = round(1000 * (time.perf_counter() - started) / len(decoded), 3)
    return result


def cost_table(rows: list[dict[str, object]]) -> str:
    header = ("| data | images | feature pass s (thumbnails kept) | thumbnails read after it s (from cache) |"
              " thumbnails' own pass s | thumbnail alone ms / image | CPU | date |")
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['data']} | {r['images']} | {r['feature_pass']['seconds']} | "
                     f"{r['thumbnails_after_it']['seconds']} ({r['thumbnails_after_it']['from_cache']}) | "
                     f"{r['thumbnail_pass']['seconds']} | {r['thumbnail_ms_per_image']} | {r['cpu']} | {r['date']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["copies", "chest", "similarity", "thumbnail-cost"])
    parser.add_argument("--data", default="tf_flowers", help="thumbnail-cost: the registered folder measured")
    parser.add_argument("--seed", type=int, default=0, help="seed of the copies' shifts and JPEG qualities")
    parser.add_argument("--train-seed", type=int, default=42, help="train --seed: the split's and the head's")
    parser.add_argument("--python-path", help="chest: also train with this checkout's src (e.g. ../main/src)")
    parser.add_argument("--python-path-label", default="main", help="the row name of --python-path's run")
    parser.add_argument("--head-only", action="store_true",
                        help="--finetune-epochs 0 (the head on cached features), both runs on one feature cache; chest: "
                             "the grouped split against --split-groups none")
    parser.add_argument("--cache-dir", help="a feature cache kept between runs: wall times "
                                            "are then not those of a first run")
    arguments = parser.parse_args()
    copies = Path(f"/tmp/cifar10_copies-{arguments.seed}")
    if arguments.experiment == "thumbnail-cost":
        raw = HERE / "split_groups_thumbnails.json"
        measured = [r for r in (json.loads(raw.read_text()) if raw.exists() else []) if r["data"] != arguments.data]
        measured.append(thumbnail_cost(arguments.data))
        print(json.dumps(measured[-1]))
        raw.write_text(json.dumps(measured, indent=1) + "\n")
        write_section("split_groups_thumbnails", "Honest validation: what the split's thumbnails cost (issue 34)",
                      cost_table(measured))
        return
    if arguments.experiment == "similarity":
        make_copies(MIRROR / "cifar10_subset", copies, arguments.seed)
        raw = HERE / "split_groups_similarity.json"
        found = [similarity(copies.name, copies, arguments.cache_dir)]
        found += [similarity(name, MIRROR / name, arguments.cache_dir)
                  for name in ("cifar10_subset", "hymenoptera", "tf_flowers", "chest_xray_pneumonia")]
        for row in found:
            print(json.dumps(row))
        raw.write_text(json.dumps(found, indent=1) + "\n")
        write_section("split_groups_similarity", "Honest validation: what tells a near-copy from a neighbour (issue 34)",
                      similarity_table(found))
        return
    rows = json.loads(RAW.read_text()) if RAW.exists() else []
    found = []
    seed = arguments.train_seed
    if arguments.experiment == "copies":
        data = make_copies(MIRROR / "cifar10_subset", copies, arguments.seed)
        quick = ["--finetune-epochs", "0"] if arguments.head_only else []
        suffix = ", --finetune-epochs 0" if arguments.head_only else ""
        with tempfile.TemporaryDirectory() as cache:  # the second run reads the first's features
            cache = arguments.cache_dir or cache
            found.append(train(str(data), f"copies: default (near-copies grouped){suffix}", quick, None, cache, seed))
            found.append(train(str(data), f"copies: --split-groups none{suffix}", ["--split-groups", "none", *quick],
                               None, cache, seed))
    elif arguments.head_only:  # this checkout's random split against its grouped one, on one feature cache
        with tempfile.TemporaryDirectory() as cache:
            cache = arguments.cache_dir or cache
            quick = ["--finetune-epochs", "0"]
            found.append(train("chest_xray_pneumonia", "default (near-copies grouped), --finetune-epochs 0", quick, None,
                               cache, seed))
            found.append(train("chest_xray_pneumonia", "--split-groups none, --finetune-epochs 0",
                               ["--split-groups", "none", *quick], None, cache, seed))
    else:
        if arguments.python_path:
            found.append(train("chest_xray_pneumonia", f"default, {arguments.python_path_label}", [],
                               arguments.python_path, arguments.cache_dir, seed))
        found.append(train("chest_xray_pneumonia", "default, near-copies grouped", [], None, arguments.cache_dir, seed))
    for row in found:
        print(json.dumps(row))
    keyed = {(r["data"], r["run"], r.get("seed", 42)): r for r in rows + found}
    RAW.write_text(json.dumps(list(keyed.values()), indent=1) + "\n")
    write_section("split_groups", "Honest validation: near-copies kept on one side of the split (issue 34)",
                  table(list(keyed.values())))


if __name__ == "__main__":
    main()
