"""Seeded stratified splits: the train / val / test cut of a folder or a manifest, the names a
split may go by, and the per-class cap of ``--max-per-class``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def stratified_split(
    by_class: dict[int, list[str]], fractions: tuple[float, ...], seed: int, classes: list[str]
) -> list[list[tuple[str, int]]]:
    """Split each class on its own so every split keeps the class proportions."""
    alone = [classes[label] for label, files in sorted(by_class.items()) if len(files) < 2]
    if alone and len(fractions) > 1 and fractions[1] > 0:
        # Its one image must train; validation then cannot tell whether the class is learnt.
        log.warning(
            "class(es) with a single image get no validation image: %s; add images to those class folders",
            ", ".join(alone),
        )
    rng = np.random.default_rng(seed)
    parts: list[list[tuple[str, int]]] = [[] for _ in fractions]
    for label, files in sorted(by_class.items()):
        order = [files[i] for i in rng.permutation(len(files))]
        counts = [int(round(len(files) * f)) for f in fractions[1:]]
        # A class with few images keeps at least one in validation, and one in training.
        if len(fractions) > 1 and fractions[1] > 0 and len(files) >= 2:
            counts[0] = max(counts[0], 1)
        while sum(counts) > len(files) - 1 and any(counts):
            counts[counts.index(max(counts))] -= 1
        start = len(files) - sum(counts)
        parts[0] += [(f, label) for f in order[:start]]
        for i, count in enumerate(counts, start=1):
            parts[i] += [(f, label) for f in order[start : start + count]]
            start += count
    return parts


def limit_per_class(items: list[tuple[str, int]], limit: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[tuple[str, int]]] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    kept = []
    for label in sorted(by_label):
        group = by_label[label]
        if len(group) > limit:
            group = [group[i] for i in sorted(rng.choice(len(group), limit, replace=False))]
        kept += group
    return kept


def split_folders(root: Path) -> dict[str, Path]:
    """{'train' | 'val' | 'test': folder} for the split folders directly in ``root``."""
    return {
        SPLIT_ALIASES[p.name.lower()]: p
        for p in root.iterdir()
        if p.is_dir() and p.name.lower() in SPLIT_ALIASES
    }


def carve_validation(
    splits: dict[str, list[tuple[str, int]]], split: tuple[float, float, float], seed: int, classes: list[str]
) -> dict[str, float]:
    """Cut val out of train (stratified) where only train and test were given, as the chest X-rays
    come; the carved splits and each one's fraction."""
    val_share = split[1] / (split[0] + split[1])
    by_class: dict[int, list[str]] = {}
    for path, label in splits["train"]:
        by_class.setdefault(label, []).append(path)
    carve = (1 - val_share, val_share)
    splits["train"], splits["val"] = stratified_split(by_class, carve, seed, classes)
    return dict(zip(SPLITS, carve))


def carve_all(
    by_class: dict[int, list[str]], split: tuple[float, float, float], seed: int, classes: list[str]
) -> tuple[dict[str, list[tuple[str, int]]], dict[str, float]]:
    """Every split cut from one pool of images (a test fraction of 0 makes none)."""
    fractions = split if split[2] > 0 else split[:2]
    parts = stratified_split(by_class, fractions, seed, classes)
    return dict(zip(SPLITS, parts)), dict(zip(SPLITS, fractions))


def finish_splits(
    splits: dict[str, list[tuple[str, int]]], max_per_class: int | None, seed: int
) -> dict[str, list[tuple[str, int]]]:
    """The splits in train / val / test order, empty ones left out, each capped per class."""
    splits = {name: splits[name] for name in SPLITS if name in splits and splits[name]}
    if max_per_class is not None:
        splits = {name: limit_per_class(items, max_per_class, seed) for name, items in splits.items()}
    return splits
