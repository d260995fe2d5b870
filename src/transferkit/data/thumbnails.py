"""Tiny grey thumbnails of the images, and the near-copies they find that the backbone's features miss.

A 1-pixel shift and a JPEG re-encoding of a 32-pixel image move its pooled features as far as an
ordinary neighbour's at times (cosine 0.77, or a third image nearly as near), while its 8 x 8 grey
thumbnail barely moves: the two split by the features' rule among cifar10_subset's 5,000 altered
copies are each other's nearest thumbnail at 0.95 (``benchmarks/split_groups.py similarity``).
The feature pass decodes every image anyway, so each thumbnail is taken from that decode
(``ThumbnailTap``) and cached beside the features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from transferkit.data.images import preprocess_image

THUMBNAIL_SIDE = 8
"""Pixels per side: 64 grey levels, averages of blocks that a pixel's shift or JPEG's noise barely moves."""

THUMBNAIL_FLOOR = 0.9
"""The least cosine similarity of two mean-subtracted thumbnails joined as copies."""

THUMBNAIL_RATIO = 0.6
"""The most a joined pair's cosine distance may be of the distance from either to its next-nearest
thumbnail, as the audit's ``DISTINCT_RATIO``: many images look alike at 8 x 8 pixels (chest
X-rays all do), so only a pair that stands apart from every other one is a copy."""


def thumbnail(image: Image.Image) -> np.ndarray:
    """``image`` in grey, averaged down to ``THUMBNAIL_SIDE`` pixels a side: one float32 row."""
    grey = image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BOX)
    return np.asarray(grey, dtype=np.float32).reshape(-1)


class ThumbnailTap:
    """The evaluation transform that also keeps each decoded image's thumbnail, by the digest of
    its bytes (``preprocessed_batches``' ``transform``): one decode serves the features and the
    thumbnail."""

    def __init__(self, preprocessing: dict[str, Any]):
        self.preprocessing = preprocessing
        self.thumbnails: dict[bytes, np.ndarray] = {}

    def __call__(self, image: Image.Image, digest: bytes) -> np.ndarray:
        self.thumbnails[digest] = thumbnail(image)
        return preprocess_image(image, self.preprocessing)

    def rows(self, paths: list[str], digests: dict[str, bytes]) -> tuple[list[str], np.ndarray]:
        """The paths decoded and their thumbnails, in order, to store under ``digests``."""
        kept = [path for path in paths if digests.get(path) in self.thumbnails]
        rows = [self.thumbnails[digests[path]] for path in kept]
        return kept, np.stack(rows) if rows else np.zeros((0, THUMBNAIL_SIDE**2), np.float32)


def thumbnail_pairs(
    thumbnails: np.ndarray, floor: float = THUMBNAIL_FLOOR, ratio: float = THUMBNAIL_RATIO
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity), i < j, of images whose thumbnails, less each one's mean grey, are
    each other's nearest, at least ``floor`` similar, and their cosine distance at most ``ratio`` of
    the distance from either to its next-nearest."""
    from transferkit.audit.checks import distinct_nearest_pairs, nearest_neighbours

    rows = np.asarray(thumbnails, dtype=np.float32)
    if len(rows) < 3:  # the next-nearest must be known
        return []
    # brightness and contrast aside, the layout alone: a re-encoding shifts the mean grey a little
    similarities, neighbours = nearest_neighbours(rows - rows.mean(axis=1, keepdims=True), 2)
    return [(i, j, float(similarities[i, 0])) for i, j in distinct_nearest_pairs(similarities, neighbours, ratio)
            if similarities[i, 0] >= floor]
