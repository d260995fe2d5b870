"""The honest split of a run's images: their pooled features computed once, before the split, so
that a carved split keeps near-copies (or ``--group-by``'s groups) on one side, and every split,
carved or given, is checked for near-copies of training images in val and test.

The features are the ones the frozen phase trains on and the audit reads (cached by content),
so the split costs a neighbour search, not a second pass over the images; the grey thumbnails
that join the near-copies the features miss are taken from the same decode and cached beside them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from transferkit._io import write_csv
from transferkit.cache.passes import cached_pooled_features, cached_thumbnails
from transferkit.cache.store import FeatureStats, backbone_digest, feature_cache_folder
from transferkit.data.groups import (
    LEAK_COLUMNS,
    Leaks,
    find_leaks,
    make_groups,
    near_copy_pairs,
)
from transferkit.data.index import DatasetIndex
from transferkit.data.thumbnails import thumbnail_pairs
from transferkit.run.folder import RunFolder

log = logging.getLogger(__name__)

MIN_CLEAN_VAL_IMAGES = 50
"""Fewer validation images without a near-copy than this cannot fit a temperature or a 95% threshold
to better than a few points, nor stop early on a steady loss, so all of them are used, with a warning."""


@dataclass
class SplitFeatures:
    """The pooled features of every image of an index, by path, and how they were had."""

    rows: dict[str, int]
    array: np.ndarray
    stats: FeatureStats
    thumbnails: Callable[[list[str]], np.ndarray] | None = None
    """The thumbnails of paths, in order, from the cache the feature pass fills: read only when a
    split is cut by near-copies."""

    def of(self, paths: list[str]) -> np.ndarray:
        return self.array[[self.rows[path] for path in paths]]

    def in_order(self, index: DatasetIndex) -> np.ndarray:
        """One row per image, in the order of ``index.splits``."""
        return self.of([path for items in index.splits.values() for path, _ in items])


def index_paths(index: DatasetIndex) -> list[str]:
    return [path for items in index.splits.values() for path, _ in items]


def pooled_features_of(index: DatasetIndex, model: Any, preprocessing: dict[str, Any], global_pool: str, backend: str,
                       cache_dir: str | None, num_workers: int, progress: bool) -> SplitFeatures:
    paths = index_paths(index)
    array, stats = cached_pooled_features(model, paths, preprocessing, global_pool, backend, cache_dir, num_workers,
                                          progress)

    def thumbnails(wanted: list[str]) -> np.ndarray:
        folder = feature_cache_folder(cache_dir) / backbone_digest(model, preprocessing, global_pool)
        return cached_thumbnails(wanted, preprocessing, folder, num_workers)[0]

    return SplitFeatures({path: i for i, path in enumerate(paths)}, np.asarray(array), stats, thumbnails)


def split_honestly(
    index: DatasetIndex, features: SplitFeatures, *, carve: bool, split_groups: str, group_by: str | None,
    threshold: float, seed: int, max_per_class: int | None = None,
) -> Leaks:
    """Cut ``index``'s carved splits again by groups (when ``carve``, unless ``split_groups`` is
    none and no ``group_by`` is given), then find the near-copies of training images in val and
    test, which is logged as one warning."""
    started = time.perf_counter()
    paths = index_paths(index)
    # The split joins more than the leak check reports: a pair joined in vain costs it nothing.
    joined, found = near_copy_pairs(features.of(paths), threshold)
    pairs = [(paths[i], paths[j], similarity) for i, j, similarity in found]
    grouped = carve and bool(index.carved) and (split_groups != "none" or bool(group_by))
    if grouped:
        labels = [label for items in index.splits.values() for _, label in items]
        if not group_by and features.thumbnails is not None:
            # copies whose features moved as far as a neighbour's, told by their layout in grey
            joined = joined + thumbnail_pairs(features.thumbnails(paths))
        groups = make_groups(paths, labels, index.root, group_by, joined, index.duplicates, index.classes)
        index.carve_by_groups(groups, seed, max_per_class)
        if len(set(groups.values())) < len(groups):
            log.info("split by %s: %d images in %d groups, %.1f s", f"--group-by {group_by!r}" if group_by else "near-copies",
                     len(paths), len(set(groups.values())), time.perf_counter() - started)
    split_of = {path: split for split, items in index.splits.items() for path, _ in items}
    leaks = find_leaks(split_of, pairs, index.duplicates, threshold)
    warn_of_leaks(leaks, carved=set(index.carved) if carve else set(), grouped=grouped, group_by=group_by)
    return leaks


def warn_of_leaks(leaks: Leaks, *, carved: set[str], grouped: bool, group_by: str | None) -> None:
    """One warning: how many pairs join train to each split, and the fix for a split this run carved
    (the grouping) or one the user gave (their folder)."""
    counts = leaks.counts()
    if not counts:
        return
    fixes = []
    if carved & set(counts):
        if not grouped:
            fixes.append("drop --split-groups none, so the split keeps near-copies on one side")
        elif group_by:
            fixes.append("widen --group-by so it joins them, or drop it to group near-copies")
        else:
            fixes.append("the carved split's near-copies chain through most of a class: give the real groups "
                         "with --group-by")
    given = [split for split in counts if split not in carved]
    if given:
        fixes.append(f"move the {' and '.join(given)} copies into train, or leave them out with --exclude leaks.csv")
    where = " and ".join(f"{count} to {split}" for split, count in counts.items())
    log.warning(
        "near-copy pairs (cosine similarity >= %.2f, or each other's distinctly nearest image) join train %s, "
        "listed in leaks.csv: those scores read higher than on new images; %s", leaks.threshold, where, "; ".join(fixes),
    )


def clean_val_rows(items: list[tuple[str, int]], leaky: set[str]) -> np.ndarray:
    """The validation rows the model is chosen on (early stopping, the best phase) and calibrated on
    (temperature, unknown threshold): those without a near-copy in train, where enough remain."""
    rows = np.array([row for row, (path, _) in enumerate(items) if path not in leaky], dtype=np.int64)
    if len(rows) == len(items):
        return rows
    if len(rows) < MIN_CLEAN_VAL_IMAGES:
        log.warning("only %d of %d validation images have no near-copy in train (fewer than %d): early stopping, "
                    "the best phase, the temperature and the unknown threshold read all %d, copies included",
                    len(rows), len(items), MIN_CLEAN_VAL_IMAGES, len(items))
        return np.arange(len(items), dtype=np.int64)
    log.info("early stopping, the best phase, the temperature and the unknown threshold read the %d of %d "
             "validation images with no near-copy in train", len(rows), len(items))
    return rows


def write_index_of_run(index: DatasetIndex, leaks: Leaks, folder: RunFolder, drop_duplicates: bool) -> None:
    """splits.csv and the lists beside it (duplicates, skipped files, leaks.csv), each list said in one warning."""
    if index.duplicates:
        kinds = index.duplicate_kinds()
        log.warning(
            "%d groups of identical images (%d across splits, %d under two classes), listed in %s%s",
            kinds["groups"], kinds["across_splits"], kinds["across_classes"], folder.duplicates_file.name,
            "; dropping them" if drop_duplicates else "; --drop-duplicates drops them",
        )
    if index.skipped:
        log.warning("skipped %d files (listed in %s)", len(index.skipped), folder.skipped_file.name)
    folder.write_index(index)
    write_csv(folder.leaks_file, LEAK_COLUMNS, leaks.rows())
