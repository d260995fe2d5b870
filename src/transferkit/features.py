"""A persistent cache of pooled backbone features, shared by every run on the machine.

A frozen backbone maps an image to the same features every time, so they are computed once per
image and kept: a second ``train`` on the same data, every run of a ``compare`` that freezes the
same backbone, or a re-run with another head reads them instead of decoding and running images.

Keys: the backbone (architecture, a digest of its weights, the preprocessing and the pooling)
names a folder; each image is keyed by the SHA-256 of its file's bytes, so renaming or moving a
file keeps its features and editing it does not. A folder holds shards (``*.npz`` with
``digests``, n x 32 bytes, and ``features``); new features go into a new shard written atomically, so a killed
run or two runs at once never leave a file that a later run trips on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import atomic_write, cache_home, content_digests, update_with_tensors

log = logging.getLogger(__name__)

DIGEST_BYTES = 32


def feature_cache_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(cache_dir) if cache_dir else cache_home() / "features"


def backbone_digest(model: Any, preprocessing: dict[str, Any], global_pool: str) -> str:
    """Names what decides an image's pooled features: architecture, backbone weights (not the
    head, so any number of classes shares them), pooling and preprocessing."""
    from transferkit.models import classifier_path

    digest = hashlib.sha256()
    head_prefix = classifier_path(model) + "."
    description = {
        "architecture": model.pretrained_cfg.get("architecture", type(model).__name__),
        "pool": global_pool,
        "preprocessing": preprocessing,
    }
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    update_with_tensors(digest, ((k, v) for k, v in model.state_dict().items() if not k.startswith(head_prefix)))
    return digest.hexdigest()[:32]


@dataclass
class FeatureStats:
    images: int
    from_cache: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "from_cache": self.from_cache, "seconds": round(self.seconds, 2)}


class FeatureCache:
    """Features of one backbone, keyed by image content."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def for_backbone(
        cls, model: Any, preprocessing: dict[str, Any], global_pool: str, cache_dir: str | os.PathLike[str] | None = None
    ) -> FeatureCache:
        return cls(feature_cache_folder(cache_dir) / backbone_digest(model, preprocessing, global_pool))

    def _load(self, wanted: set[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        if not self.folder.is_dir():
            return found
        for shard in sorted(self.folder.glob("*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as data:
                    digests, features = data["digests"], data["features"]
                if digests.dtype != np.uint8 or digests.shape != (len(features), DIGEST_BYTES):
                    raise ValueError(f"digests of shape {digests.shape} and type {digests.dtype}")
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                log.warning("feature cache: ignoring unreadable shard %s (%s)", shard, error)
                continue
            for digest, row in zip((d.tobytes() for d in digests), features):
                if digest in wanted and digest not in found:
                    found[digest] = row
        return found

    def _store(self, digests: list[bytes], features: np.ndarray) -> None:
        shard = self.folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"
        # Raw bytes, not a NumPy bytes string: that type drops trailing zero bytes, so one
        # digest in 256 would never match again.
        array = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), DIGEST_BYTES)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, digests=array, features=features.astype(np.float32, copy=False))

        atomic_write(shard, write)

    def features(self, paths: list[str], compute: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, FeatureStats]:
        """Features for every path, in order: read from the cache, ``compute`` the rest (one call,
        each distinct image once) and store them."""
        started = time.perf_counter()
        digests = content_digests(paths)
        known = self._load(set(digests))
        missing: dict[bytes, str] = {}
        for path, digest in zip(paths, digests):
            if digest not in known:
                missing.setdefault(digest, path)
        if missing:
            computed = np.asarray(compute(list(missing.values())), dtype=np.float32)
            self._store(list(missing), computed)
            known.update(zip(missing, computed))
        hits = sum(digest not in missing for digest in digests)
        result = np.stack([known[digest] for digest in digests]) if paths else np.zeros((0, 0), np.float32)
        stats = FeatureStats(images=len(paths), from_cache=hits, seconds=time.perf_counter() - started)
        log.info("features: %d images, %d from the cache (%s), %.1f s", len(paths), hits, self.folder, stats.seconds)
        return result, stats
