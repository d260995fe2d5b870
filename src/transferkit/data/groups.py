"""Images that belong together (near-copies, byte-identical files, one patient's or one track's
shots) and a split that keeps each group on one side; then the check that counts the near-copies
crossing from train into val or test, whoever made the split.

A random split of a folder holding consecutive frames of one scene puts copies of training
images into validation: the validation score then measures recall of the training images, and
early stopping, the temperature and the unknown threshold are all chosen on it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

NEIGHBOURS = 10
"""Nearest images looked at per image for near-copies, as the audit's default."""


def regex_groups(paths: Sequence[str], root: Path, pattern: str) -> list[str]:
    """Each path's group: the first capturing group of ``pattern``'s first match in the path relative
    to ``root`` (the whole match where it has none); an image it does not match is its own group."""
    compiled = re.compile(pattern)
    keys, unmatched = [], 0
    for path in paths:
        relative = Path(os.path.relpath(path, root)).as_posix()
        found = compiled.search(relative)
        if found is None:
            unmatched += 1
            keys.append(f"path:{relative}")
        else:
            keys.append(f"match:{found.group(1) if compiled.groups else found.group(0)}")
    if unmatched:
        log.warning("--group-by %r matches no part of %d of %d image paths; each of those is a group of its own",
                    pattern, unmatched, len(paths))
    return keys


SPLIT_DISTINCT_RATIO = 0.8
"""The split's distance ratio, looser than the audit's ``DISTINCT_RATIO`` (0.6): a pair wrongly
joined costs the split little (small groups stay stratified), a copy missed inflates the
validation score. Looser buys little: of cifar10_subset's 5,000 altered copies 0.85 joins none
more and 0.9 one more, while grouping 10% and 16% of cifar10_subset's images, 15% and 30% of
chest X-rays'."""

SPLIT_CLUSTER = 3
"""The most nearest images the split joins to an image at once (``distinct_cluster_pairs``): an
original, its copy and another near-copy pair of the same scene. Only the nearest one (the rule of
each other's distinct nearest) missed 14 of cifar10_subset's 5,000 altered copies, 8 of them across
the split: 10 pairs each other's nearest, but with a third image near one of them (ratio 0.80 to
0.97), and 4 whose original has up to 5 other images nearer than its copy. With 3, 2 of the 5,000
are missed (one at cosine 0.77, one at ratio 0.87; ``data.thumbnails`` joins both), and 5.5% of
cifar10_subset's images, 1.0% of hymenoptera's, 12.5% of tf_flowers' and 7.1% of chest X-rays' are
grouped with another image, in groups of at most 6 (``benchmarks/split_groups.py similarity``)."""


def distinct_cluster_pairs(
    similarities: np.ndarray, indices: np.ndarray, ratio: float = SPLIT_DISTINCT_RATIO, largest: int = SPLIT_CLUSTER
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity), i < j, of an image and one of its m nearest (m at most ``largest``)
    where those m stand apart: the m-th at least ``DISTINCT_FLOOR`` similar and its cosine distance
    at most ``ratio`` of the (m+1)-th's; and the image is among j's ``largest + 1`` nearest.

    The audit's distinct nearest pair (m = 1, seen from both) widened: a copy whose original has
    another near-copy of the scene nearer than it, or a copy nearer its original than the
    original's next image but not by the ratio from the original's side, is still joined."""
    from transferkit.audit.checks import DISTINCT_FLOOR

    largest = min(largest, similarities.shape[1] - 1)  # the (m+1)-th must be known
    rows = np.arange(len(indices))
    found: dict[tuple[int, int], float] = {}
    for m in range(1, largest + 1):
        apart = (similarities[:, m - 1] >= DISTINCT_FLOOR) & (1 - similarities[:, m - 1] <= ratio * (1 - similarities[:, m]))
        for i in rows[apart]:
            for rank in range(m):
                j = int(indices[i, rank])
                if (indices[j, : largest + 1] == i).any():  # a hub nearest to many is no one's copy
                    found[(min(int(i), j), max(int(i), j))] = float(similarities[i, rank])
    return [(i, j, similarity) for (i, j), similarity in sorted(found.items())]


def near_copy_pairs(
    features: np.ndarray, threshold: float, ratio: float = SPLIT_DISTINCT_RATIO, largest: int = SPLIT_CLUSTER
) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """Pairs (i, j, similarity) of near-copies among ``features``' rows: the split's (``threshold``,
    or ``distinct_cluster_pairs`` by ``ratio`` and ``largest``) and the audit's (``threshold``, or
    each other's distinct nearest by ``DISTINCT_RATIO``), with its neighbours and its principal
    components above 20,000 images, searched once."""
    from transferkit.audit.checks import near_duplicate_pairs, nearest_neighbours, principal_components

    features = np.asarray(features, dtype=np.float32)
    if len(features) < 2:
        return [], []
    similarities, neighbours = nearest_neighbours(features, NEIGHBOURS, principal_components(features))
    reported = near_duplicate_pairs(similarities, neighbours, threshold)
    joined = {(i, j): s for i, j, s in reported}
    for i, j, similarity in distinct_cluster_pairs(similarities, neighbours, ratio, largest):
        joined.setdefault((i, j), similarity)
    return sorted(((i, j, s) for (i, j), s in joined.items()), key=lambda pair: (-pair[2], pair[0], pair[1])), reported


def connected_groups(count: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """A group number per item: items joined by a chain of pairs share one (copies of copies too)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.array([(i, j) for i, j in pairs], dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def grouped_split(
    labels: Sequence[int], groups: Sequence[str] | np.ndarray, fractions: Sequence[float], seed: int,
    classes: list[str],
) -> np.ndarray:
    """The part (0: train, 1: val, 2: test) of each image, every group whole in one part, each
    class's images spread over the parts in ``fractions`` as closely as the groups allow.

    A greedy assignment, largest group first and equal sizes in a seeded order: each group goes
    to the part where it brings the per-class counts nearest their targets. scikit-learn's
    StratifiedGroupKFold cuts k equal folds (0.8 / 0.16 / 0.04 has no honest k) and
    GroupShuffleSplit does not stratify.
    """
    labels = np.asarray(labels, dtype=np.int64)
    _, group_of = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    counts = np.zeros((group_of.max() + 1 if len(group_of) else 0, len(classes)), dtype=np.float64)
    np.add.at(counts, (group_of, labels), 1)
    order = np.random.default_rng(seed).permutation(len(counts))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    target = np.outer(np.asarray(fractions, dtype=np.float64), counts.sum(axis=0))
    filled = np.zeros_like(target)
    part = np.zeros(len(counts), dtype=np.int64)
    for group in order:
        present = np.flatnonzero(counts[group])
        added = counts[group, present]
        # how much each part's squared distance from its share of these classes would grow
        growth = (added * (2 * (filled[:, present] - target[:, present]) + added)).sum(axis=1)
        part[group] = int(np.argmin(growth))
        filled[part[group]] += counts[group]
    if len(fractions) > 1 and fractions[1] > 0:
        _keep_every_class(counts, part, filled, classes)
    return part[group_of]


def _keep_every_class(counts: np.ndarray, part: np.ndarray, filled: np.ndarray, classes: list[str]) -> None:
    """Move the smallest group of a class into train or val where that part has none of it and
    another part can spare one; say which classes the groups leave out of val."""
    alone = []
    for label in range(counts.shape[1]):
        holders = np.flatnonzero(counts[:, label])
        for missing in (0, 1):
            if filled[missing, label] > 0:
                continue
            # a group that can move: train and val each keep at least one image of the class
            movable = [g for g in holders if part[g] != missing
                       and (part[g] == 2 or filled[part[g], label] > counts[g, label])]
            if not movable:
                if missing == 1:
                    alone.append(classes[label])
                continue
            group = min(movable, key=lambda g: (counts[g].sum(), g))
            filled[part[group]] -= counts[group]
            part[group] = missing
            filled[missing] += counts[group]
    if alone:
        # Its images must train; validation then cannot tell whether the class is learnt.
        log.warning("class(es) whose images form a single group get no validation image: %s; add images of "
                    "other groups (another patient, another scene) to those class folders", ", ".join(alone))


@dataclass
class Leaks:
    """Near-copies (and byte-identical files) of training images in val or test."""

    threshold: float
    pairs: list[tuple[float, str, str, str]] = field(default_factory=list)
    """(similarity, split, path, train path) per pair crossing, the most similar first."""

    def count(self, split: str) -> int:
        return sum(pair[1] == split for pair in self.pairs)

    def images(self, split: str) -> set[str]:
        """The images of ``split`` with a near-copy in train."""
        return {pair[2] for pair in self.pairs if pair[1] == split}

    def counts(self) -> dict[str, int]:
        return {split: self.count(split) for split in ("val", "test") if self.count(split)}

    def summary(self) -> dict[str, object]:
        """metrics.json's record: pairs per split and the images of each split they touch."""
        return {"threshold": self.threshold, "pairs": self.counts(),
                "images": {split: len(self.images(split)) for split in self.counts()}}

    def rows(self) -> Iterable[list[object]]:
        return ([f"{similarity:.4f}", split, path, "train", train_path]
                for similarity, split, path, train_path in self.pairs)


LEAK_COLUMNS = ["similarity", "split", "path", "paired_split", "paired_path"]


def find_leaks(
    split_of: dict[str, str], pairs: Iterable[tuple[str, str, float]],
    identical: Iterable[Sequence[tuple[str, str, int]]], threshold: float,
) -> Leaks:
    """The ``pairs`` of paths (and the byte-identical groups) that join a training image to a val or
    test image, by the splits of ``split_of`` (path: split)."""
    found: dict[tuple[str, str], float] = {}

    def add(first: str, second: str, similarity: float) -> None:
        if first not in split_of or second not in split_of or (split_of[first] == "train") == (split_of[second] == "train"):
            return
        train, other = (first, second) if split_of[first] == "train" else (second, first)
        found[(other, train)] = max(found.get((other, train), -1.0), similarity)

    for first, second, similarity in pairs:
        add(first, second, similarity)
    for group in identical:
        for _, first, _ in group:
            for _, second, _ in group:
                add(first, second, 1.0)
    leaks = Leaks(threshold)
    leaks.pairs = sorted(((s, split_of[other], other, train) for (other, train), s in found.items()),
                         key=lambda pair: (-pair[0], pair[1], pair[2]))
    return leaks


def make_groups(
    paths: Sequence[str], labels: Sequence[int], root: Path, group_by: str | None,
    pairs: Iterable[tuple[int, int, float]], identical: Iterable[Sequence[tuple[str, str, int]]], classes: list[str],
) -> dict[str, str]:
    """Each path's group: ``--group-by``'s matches where given, else the chains of near-copy
    ``pairs`` (row numbers of ``paths``); byte-identical files always join one group."""
    row = {path: i for i, path in enumerate(paths)}
    identical_edges = [(row[a], row[b]) for group in identical for (_, a, _), (_, b, _) in zip(group, group[1:])
                       if a in row and b in row]
    names: dict[int, str] = {}
    if group_by:
        keys = regex_groups(paths, root, group_by)
        first: dict[str, int] = {}
        edges = identical_edges + [(first.setdefault(key, i), i) for i, key in enumerate(keys)]
        component = connected_groups(len(paths), edges)
        for i, key in enumerate(keys):
            names.setdefault(int(component[i]), key.partition(":")[2])
    else:
        component = _unchained(connected_groups(len(paths), identical_edges + [(i, j) for i, j, _ in pairs]),
                               connected_groups(len(paths), identical_edges), np.asarray(labels), classes)
    return {path: names.get(int(component[i]), f"g{component[i]}") for i, path in enumerate(paths)}


def given_groups(paths: Sequence[str], keys: dict[str, str], identical: Iterable[Sequence[tuple[str, str, int]]]) -> dict[str, str]:
    """Each path's group as a manifest's group column gives it (``keys``; a path without one is a
    group of its own), byte-identical files joined as ``make_groups`` joins them."""
    row = {path: i for i, path in enumerate(paths)}
    first: dict[str, int] = {}
    edges = [(first.setdefault(f"key:{keys[path]}", i), i) for i, path in enumerate(paths) if keys.get(path)]
    edges += [(row[a], row[b]) for group in identical for (_, a, _), (_, b, _) in zip(group, group[1:])
              if a in row and b in row]
    component = connected_groups(len(paths), edges)
    names: dict[int, str] = {}
    for i, path in enumerate(paths):
        if keys.get(path):
            names.setdefault(int(component[i]), keys[path])
    return {path: names.get(int(component[i]), f"g{component[i]}") for i, path in enumerate(paths)}


def _unchained(component: np.ndarray, identical: np.ndarray, labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """``component``, with each group that holds more than half of a class's images cut back to
    its byte-identical files: such a chain says the features cannot tell the class's images apart
    (a backbone unfit for them), not that they are copies, and would leave the class out of val."""
    sizes = np.zeros((component.max() + 1, len(classes)), dtype=np.int64)
    np.add.at(sizes, (component, labels), 1)
    chained = np.flatnonzero(((sizes > 1) & (sizes > np.bincount(labels, minlength=len(classes)) / 2)).any(axis=1))
    if not len(chained):
        return component
    cut = np.isin(component, chained)
    names = sorted({classes[label] for label in labels[cut]})
    log.warning(
        "near-copies chain %d images of %s into %d group(s) of more than half a class: the backbone's features "
        "cannot tell them apart, so they are split one by one (byte-identical files together); give the real "
        "groups with --group-by", int(cut.sum()), ", ".join(names), len(chained),
    )
    # identical-file groups numbered after every component, so the two numberings never meet
    return np.where(cut, component.max() + 1 + identical, component)
