"""Passes of a backbone over images whose outputs the cache keeps: pooled features, through the store."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from transferkit.cache.store import FeatureCache, FeatureStats
from transferkit.inference.predictor import create_forward, run_forward


def extract_features(
    model: Any,
    paths: list[str],
    preprocessing: dict[str, Any],
    backend: str,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
    digests: dict[str, bytes] | None = None,
) -> np.ndarray:
    """Pooled (pre-logits) features of ``model``'s backbone for every path, in order, without
    augmentation: exactly what its classifier sees, dropout aside.

    ``backend``: one of ``inference.predictor.BACKENDS``; "onnx" exports the backbone once (kept in the
    ONNX cache) and runs it in ONNX Runtime. ``digests``: see ``inference.predictor.preprocessed_batches``.
    """
    from transferkit.models.create import PooledFeatures

    forward = create_forward(PooledFeatures(model), preprocessing["input_size"], backend)
    return run_forward(forward, paths, preprocessing, batch_size, num_workers, progress, "features", digests=digests)


def cached_pooled_features(
    model: Any,
    paths: list[str],
    preprocessing: dict[str, Any],
    global_pool: str,
    backend: str,
    cache_dir: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, FeatureStats]:
    """``extract_features`` of every path through the persistent cache: the images a train of the
    same backbone and preprocessing has seen cost nothing."""
    cache = FeatureCache.for_backbone(model, preprocessing, global_pool, cache_dir)

    def compute(missing: list[str], digests: dict[str, bytes]) -> np.ndarray:
        return extract_features(model, missing, preprocessing, backend, num_workers=num_workers,
                                progress=progress, digests=digests)

    return cache.features(paths, compute)
