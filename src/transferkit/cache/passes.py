"""Passes of a backbone over images whose outputs the cache keeps: pooled features, through the
store, and the grey thumbnails taken from the same decode."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.cache.store import FeatureCache, FeatureStats
from transferkit.data.thumbnails import THUMBNAIL_SIDE, ThumbnailTap, thumbnail
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
    tap: ThumbnailTap | None = None,
) -> np.ndarray:
    """Pooled (pre-logits) features of ``model``'s backbone for every path, in order, without
    augmentation: exactly what its classifier sees, dropout aside.

    ``backend``: one of ``inference.predictor.BACKENDS``; "onnx" exports the backbone once (kept in the
    ONNX cache) and runs it in ONNX Runtime. ``digests``: see ``inference.predictor.preprocessed_batches``.
    ``tap``: keeps each image's thumbnail too (needs ``digests``).
    """
    from transferkit.models.create import PooledFeatures

    forward = create_forward(PooledFeatures(model), preprocessing["input_size"], backend)
    return run_forward(forward, paths, preprocessing, batch_size, num_workers, progress, "features", digests=digests,
                       transform=tap)


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
    thumbnails = thumbnail_cache(cache.folder)

    def compute(missing: list[str], digests: dict[str, bytes]) -> np.ndarray:
        tap = ThumbnailTap(preprocessing)
        features = extract_features(model, missing, preprocessing, backend, num_workers=num_workers,
                                    progress=progress, digests=digests, tap=tap)
        thumbnails.store(*tap.rows(missing, digests), digests)
        return features

    return cache.features(paths, compute)


def thumbnail_cache(features_folder: Path) -> FeatureCache:
    """The cache of the thumbnails of the images a backbone's features folder holds, in a folder
    inside it: the decode that gives its features (JPEGs drafted to its resize side) gives them."""
    return FeatureCache(features_folder / f"thumbnails-{THUMBNAIL_SIDE}px-grey", kind="thumbnails",
                        row_shape=(THUMBNAIL_SIDE**2,), warns_as=features_folder)


def cached_thumbnails(
    paths: list[str], preprocessing: dict[str, Any], features_folder: Path, num_workers: int | None = None,
) -> tuple[np.ndarray, FeatureStats]:
    """The thumbnail of every path (``data.thumbnails``), in order: those the feature pass kept from
    the cache, the rest (features cached before thumbnails were kept) decoded in a pass of their own."""

    def compute(missing: list[str], digests: dict[str, bytes]) -> np.ndarray:
        return run_forward(lambda batch: batch, missing, preprocessing, num_workers=num_workers,
                           description="thumbnails", digests=digests, transform=lambda image, _: thumbnail(image))

    return thumbnail_cache(features_folder).features(paths, compute)
