"""``transferkit audit``: the images that cost accuracy before any training, from the backbone
features the feature cache already holds.

- label issues: out-of-sample probabilities (k-fold logistic regression on the features, or on
  their principal components above 20,000 images), then cleanlab's confident learning ranks the
  labels to doubt;
- near-copies: pairs of images whose features' cosine similarity passes a threshold, beyond the
  byte-identical groups; flagged as leakage when they cross splits and as a label conflict when
  they cross classes;
- outliers: images far from every class (cosine distance to the nearest class centre);
- class health: counts, imbalance, too few images for a split, each class's estimated label noise.

Nothing is moved or deleted: the findings are written to ``audit.csv`` (one row per flagged image,
the input of ``train --exclude``), ``audit.json`` (counts), ``scores.csv`` (every image's scores)
and ``audit.html``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import write_csv, write_json
from transferkit.audit.checks import (
    class_health,
    find_label_issues,
    near_duplicate_pairs,
    nearest_neighbours,
    out_of_sample_probabilities,
    outlier_cut,
    outlier_scores,
    principal_components,
)
from transferkit.audit.config import AuditConfig
from transferkit.audit.findings import CSV_COLUMNS, KINDS, AuditResult, Finding, ImageScores
from transferkit.config import DataConfig, ModelConfig
from transferkit.data.registry import source_problems
from transferkit.errors import ConfigError

log = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "val", "test")


def default_output(data: str | os.PathLike[str]) -> Path:
    return Path("runs", f"audit-{Path(os.fspath(data)).name or 'data'}")


def audit(data: str | os.PathLike[str], config: AuditConfig | None = None) -> AuditResult:
    """Audit the images of ``data`` (an image folder or a registered dataset name, as ``train``
    takes) and write the findings to ``config.output`` (default ``runs/audit-<data>``).

    Splits are made as train makes them with the same ``seed`` and ``split``, so leakage is
    judged on the splits a train of the same folder uses.
    """
    from transferkit.data.exclude import read_exclusions
    from transferkit.data.folders import discover
    from transferkit.data.images import scan_images
    from transferkit.data.registry import resolve_data_source

    problems = source_problems(data)
    if problems:
        raise ConfigError(problems)
    config = config if config is not None else AuditConfig()
    root = resolve_data_source(os.fspath(data), config.data.data_mirror, config.data.download)
    index = discover(root, config.data.split, config.seed, config.data.max_per_class)
    paths = [path for items in index.splits.values() for path, _ in items]
    index.drop(scan_images(paths, config.data.resolved_num_workers()))
    if config.data.exclude:  # an audit again after leaving some out
        readable = {path for items in index.splits.values() for path, _ in items}
        index.drop(read_exclusions(config.data.exclude, index.root, readable))
    index.find_duplicates()
    output = Path(config.output) if config.output else default_output(data)
    features, stats = _split_as_train_does(index, config)
    return audit_index(index, config, output, features, stats)


def _split_as_train_does(index: Any, config: AuditConfig) -> tuple[np.ndarray, Any]:
    """The carved split cut again by the groups train makes (near-copies, or ``--group-by``'s), on
    the same features, so the leakage judged is that of a train of the same folder."""
    import torch

    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.inference.predictor import default_backend
    from transferkit.models.create import create_classifier
    from transferkit.training.splitting import pooled_features_of, split_honestly

    model = create_classifier(config.model, len(index.classes), config.data.image_size)
    features = pooled_features_of(
        index, model, resolve_preprocessing(model, config.data.image_size), config.model.global_pool,
        default_backend("cuda" if torch.cuda.is_available() else "cpu"), config.cache_dir,
        config.data.resolved_num_workers(), config.progress,
    )
    split_honestly(index, features, carve=True, split_groups=config.data.split_groups, group_by=config.data.group_by,
                   threshold=config.duplicate_threshold, seed=config.seed, max_per_class=config.data.max_per_class)
    return features.in_order(index), features.stats


def audit_of_run(
    index: Any, data: DataConfig, model: ModelConfig, seed: int, cache_dir: str | None, progress: bool, output: Path,
    features: np.ndarray | None = None,
) -> str:
    """``train --audit``: the audit of a run's own images and splits, on the pooled features its
    frozen phase trained on where it has them (rows in ``index.splits``' order), else on the
    feature cache's; returns the one-line summary. The model is saved by then, so a failure here
    costs only the audit, with a warning."""
    try:
        config = AuditConfig(data=data, model=model, seed=seed, cache_dir=cache_dir, progress=progress)
        return audit_index(index, config, output, features).line()
    except Exception as error:  # noqa: BLE001 - the trained model must survive whatever the audit meets
        log.warning("the audit of the run's images failed (%s); run `transferkit audit` on the data to see why", error)
        return ""


def audit_index(
    index: Any, config: AuditConfig, output: Path, features: np.ndarray | None = None, feature_stats: Any = None,
) -> AuditResult:
    """The audit of a ``DatasetIndex`` (train passes its own, and its features, and how they were
    had where this audit computed them), written to ``output``."""
    started = time.perf_counter()
    classes = index.classes
    entries = [(split, path, label) for split, items in index.splits.items() for path, label in items]
    paths = [path for _, path, _ in entries]
    labels = np.array([label for _, _, label in entries], dtype=np.int64)
    features, stats = _audit_features(paths, len(classes), config, features, feature_stats)

    timings: dict[str, float] = {"features": round(stats.seconds, 2)}
    clock = time.perf_counter()
    components = principal_components(features)  # None below 20,000 images: the whole features
    timings["components"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    fitted = out_of_sample_probabilities(
        features if components is None else components, labels, len(classes), config.folds, config.seed
    )
    probabilities = fitted.probabilities
    issues = find_label_issues(labels, probabilities)
    timings["label_issues"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    similarities, neighbours = nearest_neighbours(features, config.neighbours, components)
    pairs = near_duplicate_pairs(similarities, neighbours, config.duplicate_threshold)
    scores = outlier_scores(features, labels, len(classes))
    cut = outlier_cut(scores)
    timings["neighbours"] = round(time.perf_counter() - clock, 2)

    images = ImageScores(paths, [split for split, _, _ in entries], labels, probabilities, issues.quality,
                         issues.suggested, scores)
    findings = _all_findings(images, issues.ranked, pairs, index.duplicates, classes, cut)
    issues_per_class = np.bincount(labels[issues.ranked], minlength=len(classes))
    health, imbalance = class_health(classes, index.counts(), issues.noise_rate, issues_per_class)
    timings["total"] = round(time.perf_counter() - started, 2)
    summary = {
        "data": str(index.root), "model": config.model.name, "images": len(paths), "classes": classes,
        "counts": _counts(findings, index.duplicates), "skipped": len(index.skipped),
        "duplicate_threshold": config.duplicate_threshold, "neighbours": config.neighbours,
        "principal_components": None if components is None else components.shape[1],
        "regularisation": fitted.regularisation, "out_of_sample_log_loss": round(fitted.log_loss, 4),
        "outlier_cut": round(cut, 6), "imbalance_ratio": round(imbalance, 3),
        "class_health": [asdict(h) for h in health],
        "features": stats.as_dict(), "seconds": timings,
    }
    result = AuditResult(output, classes, findings, summary, health, images, list(index.skipped))
    write_audit(result, html=config.html)
    log.info("%s; written to %s", result.line(), output)
    return result


def _audit_features(
    paths: list[str], num_classes: int, config: AuditConfig, features: np.ndarray | None, feature_stats: Any,
) -> tuple[np.ndarray, Any]:
    """The pooled features of ``paths`` as float32 and how they were had: those given, else the feature cache's."""
    import torch

    from transferkit.cache.passes import cached_pooled_features
    from transferkit.cache.store import FeatureStats
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.inference.predictor import default_backend
    from transferkit.models.create import create_classifier

    if features is None:
        model = create_classifier(config.model, num_classes, config.data.image_size)
        preprocessing = resolve_preprocessing(model, config.data.image_size)
        features, stats = cached_pooled_features(
            model, paths, preprocessing, config.model.global_pool,
            backend=default_backend("cuda" if torch.cuda.is_available() else "cpu"), cache_dir=config.cache_dir,
            num_workers=config.data.resolved_num_workers(), progress=config.progress,
        )
    else:
        stats = feature_stats or FeatureStats(images=len(paths), from_cache=len(paths), seconds=0.0)
    return np.asarray(features, dtype=np.float32), stats


def _all_findings(
    images: ImageScores, ranked: np.ndarray, pairs: Any, duplicates: Any, classes: list[str], cut: float,
) -> list[Finding]:
    """Label issues, near-copy pairs and outliers above ``cut``, grouped by kind, each kind in its ranking."""
    findings = _label_findings(images, ranked, classes)
    findings += _pair_findings(images, pairs, duplicates, classes)
    flagged = np.argsort(-images.outlier_score, kind="stable")
    findings += [
        Finding("outlier", images.paths[i], images.splits[i], classes[images.labels[i]], float(images.outlier_score[i]))
        for i in flagged if images.outlier_score[i] > cut
    ]
    findings.sort(key=lambda finding: KINDS.index(finding.kind))  # stable: each kind keeps its ranking
    return findings


def _counts(findings: list[Finding], duplicates: Any) -> dict[str, int]:
    counts = {kind: sum(f.kind == kind for f in findings) for kind in KINDS}
    counts["near_duplicate_pairs"] = counts["label_conflict"] + counts["leakage"] + counts["near_duplicate"]
    counts["identical_groups"] = len(duplicates)
    return counts


def _label_findings(images: ImageScores, ranked: np.ndarray, classes: list[str]) -> list[Finding]:
    return [
        Finding("label_issue", images.paths[i], images.splits[i], classes[images.labels[i]],
                float(images.label_quality[i]), suggested_label=classes[images.suggested[i]])
        for i in ranked
    ]


def _pair_findings(
    images: ImageScores, pairs: list[tuple[int, int, float]], identical_groups: list[list[tuple[str, str, int]]],
    classes: list[str],
) -> list[Finding]:
    """One finding per pair: byte-identical groups as each copy paired with the one kept (the
    first in train / val / test order), then the near-copies the neighbours found. ``path`` is
    the copy a user would leave out, the later split's."""
    position = {path: i for i, path in enumerate(images.paths)}
    group_of: dict[int, int] = {}
    found: dict[tuple[int, int], tuple[float, bool]] = {}
    for number, group in enumerate(identical_groups):
        members = sorted((position[path] for _, path, _ in group if path in position), key=lambda i: _order(images, i))
        for member in members:
            group_of[member] = number
        for member in members[1:]:
            found[(members[0], member)] = (1.0, True)
    for i, j, similarity in pairs:
        if i in group_of and group_of[i] == group_of.get(j):
            continue  # listed above, each copy once
        keep, drop = sorted((i, j), key=lambda k: _order(images, k))
        found.setdefault((keep, drop), (similarity, False))
    findings = []
    for (keep, drop), (similarity, identical) in sorted(found.items(), key=lambda item: -item[1][0]):
        crosses_classes = images.labels[keep] != images.labels[drop]
        crosses_splits = images.splits[keep] != images.splits[drop]
        kind = "label_conflict" if crosses_classes else "leakage" if crosses_splits else "near_duplicate"
        findings.append(Finding(
            kind, images.paths[drop], images.splits[drop], classes[images.labels[drop]], similarity,
            paired_path=images.paths[keep], paired_split=images.splits[keep],
            paired_label=classes[images.labels[keep]], identical=identical,
        ))
    return findings


def _order(images: ImageScores, i: int) -> tuple[int, str]:
    split = images.splits[i]
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), images.paths[i])


def write_audit(result: AuditResult, html: bool = True) -> None:
    """audit.csv, scores.csv, audit.json and (unless asked not to) audit.html in ``result.output``."""
    result.output.mkdir(parents=True, exist_ok=True)
    write_csv(result.csv_file, CSV_COLUMNS, (finding.row() for finding in result.findings))
    images, classes = result.images, result.classes
    write_csv(
        result.output / "scores.csv",
        ["path", "split", "label", "label_quality", "suggested_label", "outlier_score"],
        ([images.paths[i], images.splits[i], classes[images.labels[i]], f"{images.label_quality[i]:.6f}",
          classes[images.suggested[i]], f"{images.outlier_score[i]:.6f}"] for i in range(len(images.paths))),
    )
    write_json(result.json_file, result.summary)
    if html:
        from transferkit.audit.page import write_page

        write_page(result)
