"""The audit's measurements on plain arrays: a row of backbone features and a label per image in,
scores out. No files, no models: each function is checked on its own against data made to have
the problem it looks for.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

FEW_TRAIN_IMAGES = 10
"""A class with fewer training images learns a head from too few examples to generalise."""
FEW_VAL_IMAGES = 5
"""A class with fewer validation images has a recall that moves by 20 points or more per image."""


REGULARISATIONS = (1.0, 0.1, 0.01, 0.001)
"""The logistic regression's C (on standardised features) is the one of these whose out-of-sample
probabilities have the lowest log loss on the given labels. C=1 alone was over-confident out of
sample (log loss 1.1 on chest X-rays, most suspects scored 0.0000) and ranked flipped labels
worse: with 5% of the training labels flipped (seeds 0-2, share in the top 2x suspects), C=1
against C=0.01: chest_xray_pneumonia 71.3% against 93.5%, tf_flowers 87.3% against 92.7%,
hymenoptera 88.9% both. A folder of a few dozen images needs a weaker penalty, as sklearn's C
weighs the sum of the losses. ``benchmarks/audit_data.py`` has the chosen C per dataset."""


@dataclass
class OutOfSample:
    probabilities: np.ndarray
    """Every image's class probabilities from a model that never saw it."""
    regularisation: float
    """The C chosen."""
    log_loss: float


def out_of_sample_probabilities(
    features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 42
) -> OutOfSample:
    """Every image's class probabilities from a logistic regression that never saw it: the
    images are cut into stratified ``folds`` and each fold is predicted by a model fit on the
    others. Out-of-sample, so a mislabelled image is not memorised into looking right. Each of
    ``REGULARISATIONS`` is fitted; the lowest out-of-sample log loss chooses.

    Fewer folds where the smallest class has fewer images than ``folds`` (at least two); a
    class missing from a fold's training images gets probability 0 there.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels, minlength=num_classes)
    folds = int(max(2, min(folds, counts[counts > 0].min())))
    probabilities = {c: np.zeros((len(labels), num_classes), dtype=np.float64) for c in REGULARISATIONS}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class has only 1 member": handled above, and such a class is
        # then absent from one fold's training images, which the columns below allow for.
        warnings.simplefilter("ignore", UserWarning)
        parts = list(splitter.split(features, labels))
    for fit_rows, predict_rows in parts:
        fit_classes = np.unique(labels[fit_rows])
        if len(fit_classes) < 2:  # a fold of one class: nothing to tell apart
            for fold_probabilities in probabilities.values():
                fold_probabilities[np.ix_(predict_rows, fit_classes)] = 1.0
            continue
        scaler = StandardScaler().fit(features[fit_rows])
        fit_on, predict_on = scaler.transform(features[fit_rows]), scaler.transform(features[predict_rows])
        # From the strongest penalty to the weakest, each fit starting where the one before ended:
        # the loss is convex, so the same optima up to the solver's tolerance and iteration cap,
        # in fewer iterations.
        model = LogisticRegression(max_iter=300, warm_start=True)  # 300 iterations bound the time at cifar10's size
        for c in sorted(REGULARISATIONS):
            model.set_params(C=c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning: the ranking is what is used, not the fit
                model.fit(fit_on, labels[fit_rows])
            probabilities[c][np.ix_(predict_rows, model.classes_)] = model.predict_proba(predict_on)
    rows = np.arange(len(labels))
    losses = {c: float(-np.log(np.clip(p[rows, labels], 1e-12, 1)).mean()) for c, p in probabilities.items()}
    chosen = min(losses, key=losses.__getitem__)
    return OutOfSample(probabilities[chosen], chosen, losses[chosen])


@dataclass
class LabelIssues:
    """Confident learning's verdict on the given labels."""

    ranked: np.ndarray
    """Indices of the images whose label is likely wrong, the most likely first."""
    quality: np.ndarray
    """Every image's label-quality score in [0, 1]: the probability of its given label (lower is worse)."""
    suggested: np.ndarray
    """Every image's most probable label other than its given one: what a suspect should be."""
    noise_rate: np.ndarray
    """Per given class: the estimated share of its images whose true class is another."""


def find_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> LabelIssues:
    """cleanlab's confident learning on out-of-sample ``probabilities``: which labels to doubt
    (``prune_by_noise_rate``, ranked by self-confidence), every image's label quality and each
    class's estimated noise rate from the calibrated confident joint."""
    from cleanlab.count import compute_confident_joint
    from cleanlab.filter import find_label_issues as cleanlab_find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = cleanlab_find_label_issues(
        labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -1
    suggested = others.argmax(axis=1)
    joint = compute_confident_joint(labels, probabilities)
    given = joint.sum(axis=1)
    noise_rate = np.where(given > 0, 1 - np.diag(joint) / np.maximum(given, 1), 0.0)
    return LabelIssues(np.asarray(ranked, dtype=np.int64), quality, suggested, noise_rate)


REDUCED_DIMENSIONS = 256
"""Above ``REDUCE_ABOVE_IMAGES`` images, the regression and the neighbour search run on this many
principal components of the features."""
REDUCE_ABOVE_IMAGES = 20_000


def principal_components(features: np.ndarray) -> np.ndarray | None:
    """For more than ``REDUCE_ABOVE_IMAGES`` images of more than ``REDUCED_DIMENSIONS`` values:
    the L2-normalised features on their first ``REDUCED_DIMENSIONS`` principal components (a
    randomized PCA); else None, and the checks use the whole features.

    Both costs grow with the feature width: the logistic regression's (and its iterations to
    converge) and the neighbour search's. Measured on cifar10's 60,000 Lite0 features with 5% of
    the training labels flipped (``benchmarks/audit_data.py``): on 256 components, the audit took
    69 s in all and put 88.9% of the flipped images in the top 2x suspects; on the 1,280
    features, 90.5%, but the label issues alone took 354 s (the issue asks for the whole audit
    in under 2 minutes).
    """
    if len(features) <= REDUCE_ABOVE_IMAGES or features.shape[1] <= REDUCED_DIMENSIONS:
        return None
    from sklearn.decomposition import PCA

    return PCA(REDUCED_DIMENSIONS, svd_solver="randomized", random_state=0).fit_transform(_unit(features)).astype(np.float32)


def nearest_neighbours(
    features: np.ndarray, k: int, components: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarities, indices) of every image's ``k`` nearest other images, nearest first.

    scikit-learn's search by brute force: on L2-normalised rows the Euclidean distance orders as
    cosine similarity does, and it is one matrix product a block at a time (no n x n matrix is
    held). Its cost grows with images squared times feature width: given the features'
    ``components`` (``principal_components``), the search runs on them for 2k candidates (5x
    fewer multiplications for Lite0's 1,280 features at 256), and the k most similar of them on
    the whole features are kept, so every reported similarity is exact.
    """
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(features) - 1)
    if k < 1:
        return np.zeros((len(features), 0), np.float32), np.zeros((len(features), 0), np.int64)
    unit = _unit(features)
    searched, candidates = unit, k
    if components is not None:
        searched, candidates = _unit(components), min(2 * k, len(unit) - 1)
    index = NearestNeighbors(n_neighbors=candidates, algorithm="brute", metric="euclidean").fit(searched)
    _, indices = index.kneighbors()  # without X: an image is not its own neighbour
    similarities = np.empty(indices.shape, np.float32)
    for start in range(0, len(unit), 1024):  # 1,024 x 2k feature rows at a time, not n x 2k
        rows = slice(start, start + 1024)
        similarities[rows] = np.einsum("nd,nkd->nk", unit[rows], unit[indices[rows]])
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    similarities = np.clip(np.take_along_axis(similarities, order, axis=1), -1, 1)
    return similarities, np.take_along_axis(indices, order, axis=1)


DISTINCT_RATIO = 0.6
"""Two images that are each other's nearest are near-copies below the threshold too where their
cosine distance is at most this share of the distance from either to its next-nearest image.
A 1-pixel shift and a JPEG re-encoding of a 32-px cifar10 image (7 px at 224) leave its copy at
0.77 to 0.99 (median 0.95): 2,341 of 5,000 such copies reach 0.95, while 0.85 already chains 97%
of chest X-rays into one group. The copy stands out from the other neighbours instead: distance
ratio median 0.25, 99th percentile 0.64, where other mutual nearest pairs have a median of 0.92
to 0.95; at 0.6, 4,916 of the 5,000 copies are joined, and 0 to 30 other pairs per real folder,
mostly one scene's shots (a burst of one flower, one car photographed twice); 0.7 joined 4,966
but also two different scenes of the tests' random backbone (``benchmarks/split_groups.py
similarity`` has the measurements per dataset)."""
DISTINCT_FLOOR = 0.8
"""The least cosine similarity of a distinct nearest pair: an image far from every other one has a
"nearest" that is no copy, whatever the ratio."""


def near_duplicate_pairs(
    similarities: np.ndarray, indices: np.ndarray, threshold: float, ratio: float = DISTINCT_RATIO
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity) with i < j whose cosine similarity is at least ``threshold``, or
    that are each other's distinct nearest image (by ``ratio``), each pair once, the most similar
    first."""
    rows, columns = np.nonzero(similarities >= threshold)
    pairs: dict[tuple[int, int], float] = {}
    for row, column in zip(rows, columns):
        i, j = sorted((int(row), int(indices[row, column])))
        pairs[(i, j)] = max(pairs.get((i, j), -1.0), float(similarities[row, column]))
    for i, j in distinct_nearest_pairs(similarities, indices, ratio):
        pairs.setdefault((i, j), float(similarities[i, 0]))
    return sorted(((i, j, s) for (i, j), s in pairs.items()), key=lambda pair: (-pair[2], pair[0], pair[1]))


def distinct_nearest_pairs(
    similarities: np.ndarray, indices: np.ndarray, ratio: float = DISTINCT_RATIO
) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of images that are each other's nearest, at least ``DISTINCT_FLOOR``
    similar, and much nearer each other than to any third image (their distance at most ``ratio``
    of the next-nearest's)."""
    if similarities.shape[1] < 2:  # no next-nearest image to compare with
        return []
    nearest, closest, next_closest = indices[:, 0], similarities[:, 0], similarities[:, 1]
    rows = np.arange(len(nearest))
    first = np.flatnonzero((nearest[nearest] == rows) & (rows < nearest) & (closest >= DISTINCT_FLOOR))
    second = nearest[first]
    farther = np.maximum(next_closest[first], next_closest[second])
    keep = 1 - closest[first] <= ratio * (1 - farther)
    return [(int(i), int(j)) for i, j in zip(first[keep], second[keep])]


def outlier_scores(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Every image's cosine distance to the nearest class centre (the mean direction of a
    class's features): high for an image far from every class, whatever folder it is in.

    Not the distance to the nearest images: outliers come in groups (a batch of screenshots, a
    folder of another dataset's images), and each member of a group has the others for
    neighbours. 20 cifar10 images filed into hymenoptera were 0 of the top 40 by mean distance
    to the 10 nearest images, and 20 of the top 40 by distance to the nearest class centre.
    """
    unit = _unit(features)
    centres = np.zeros((num_classes, unit.shape[1]), np.float32)
    np.add.at(centres, labels, unit)
    centres = _unit(centres)
    return 1 - (unit @ centres.T).max(axis=1)


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def outlier_cut(scores: np.ndarray) -> float:
    """The score above which an image is flagged: Tukey's fence, the third quartile plus 1.5
    interquartile ranges. Measured: it flags 21 of hymenoptera's 397 images and 33 of
    tf_flowers' 3,670 as published, and 14 of 20 cifar10 images filed into hymenoptera (23
    flagged); three ranges (the far-out fence) flagged none of them, and a median-absolute-
    deviation cut at 3.5 (2026-12-07: 7 on hymenoptera, 2 on tf_flowers) kept 8 of the 20. No gap
    in the scores marks where images stop standing out, so the page folds the list's tail instead
    (``audit.page.OUTLIERS_OPEN``). The ranking is the finding, the cut only bounds the list."""
    if len(scores) == 0:
        return float("inf")
    first, third = np.percentile(scores, [25, 75])
    return float(third + 1.5 * (third - first))


@dataclass
class ClassHealth:
    name: str
    images: dict[str, int]
    """Images per split."""
    share: float
    """Of all images."""
    noise_rate: float
    label_issues: int
    problems: list[str]


def class_health(
    classes: list[str], split_counts: dict[str, dict[str, int]], noise_rate: np.ndarray, issues_per_class: np.ndarray
) -> tuple[list[ClassHealth], float]:
    """Each class's counts, estimated noise and problems, and the imbalance ratio (the largest
    class's images over the smallest's)."""
    totals = {name: sum(counts.get(name, 0) for counts in split_counts.values()) for name in classes}
    everything = max(sum(totals.values()), 1)
    health = []
    for k, name in enumerate(classes):
        images = {split: counts.get(name, 0) for split, counts in split_counts.items()}
        problems = []
        if images.get("train", 0) < FEW_TRAIN_IMAGES:
            problems.append(f"only {images.get('train', 0)} training images (fewer than {FEW_TRAIN_IMAGES})")
        if "val" in images and images["val"] < FEW_VAL_IMAGES:
            problems.append(f"only {images['val']} validation images (fewer than {FEW_VAL_IMAGES})")
        if noise_rate[k] >= 0.1:
            problems.append(f"about {noise_rate[k]:.0%} of its labels look wrong")
        health.append(ClassHealth(name, images, totals[name] / everything, float(noise_rate[k]),
                                  int(issues_per_class[k]), problems))
    smallest = min(totals.values())
    imbalance = max(totals.values()) / smallest if smallest else float("inf")
    return health, float(imbalance)
