"""The persistent cache of backbone outputs (pooled features, boundary activations, views): one
folder per model and preprocessing, rows keyed by each image's content."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import atomic_write, cache_home, content_digests, update_with_tensors
from transferkit.cache.checks import ShardChecks, warn_once
from transferkit.cache.compaction import COMPACT_AT, merge_shards, remove_shards
from transferkit.cache.shard_file import DIGEST_BYTES, ShardRows, write_shard
from transferkit.cache.shards import CachedRows, OpenFiles, row_shape_of

log = logging.getLogger("transferkit.cache")  # one logger for the cache: users filter on it

CHUNK = 4096
"""Images computed and stored as one shard: what a killed pass can lose at most."""


Compute = Callable[[list[str], dict[str, bytes]], np.ndarray]
"""Features of each path, one row per path in order; it records in the dict the SHA-256 of the
bytes each row was computed from (``extract_features(..., digests=)`` does)."""


class _ShapeChanged(Exception):
    """The model gave rows of another shape than the shards this pass read, whose shape it took
    for the model's: the pass starts again, knowing the model's."""


def feature_cache_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(cache_dir) if cache_dir else cache_home() / "features"


def backbone_digest(model: Any, preprocessing: dict[str, Any], global_pool: str) -> str:
    """Names what decides an image's pooled features: architecture, backbone weights (not the
    head, so any number of classes shares them), pooling, preprocessing, and the export revision
    (features computed through a wrongly simplified export are not reused)."""
    from transferkit.inference.onnx_runtime import EXPORT_REVISION
    from transferkit.models.create import classifier_path

    digest = hashlib.sha256()
    head_prefix = classifier_path(model) + "."
    description = {
        "architecture": model.pretrained_cfg.get("architecture", type(model).__name__),
        "pool": global_pool,
        "preprocessing": preprocessing,
        "export": EXPORT_REVISION,
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

    def __init__(
        self, folder: Path, dtype: type = np.float32, kind: str = "features", row_shape: tuple[int, ...] | None = None,
        fingerprint: str | None = None, warns_as: Path | None = None,
    ):
        self.folder = folder
        self.warns_as = warns_as or folder
        """The folder its warnings are said once for: a folder inside another fails with it, and says so once."""
        self.dtype = np.dtype(dtype)
        """How rows are stored: boundary activations, 50 times the size of pooled features, keep float16."""
        self.kind = kind
        """What the rows are, in the log."""
        self.row_shape = tuple(row_shape) if row_shape is not None else None
        """The shape of the rows this run's model gives (``output_row_shape``); None: the first
        rows computed tell, and until then the first shard read."""
        self.fingerprint = fingerprint or folder.name
        """What the rows come from, recorded in every shard and compared with each shard read:
        the folder's name, a digest of model, preprocessing and boundary, by default."""
        self.checks = ShardChecks(folder, self.dtype, self.fingerprint)

    @classmethod
    def for_backbone(
        cls, model: Any, preprocessing: dict[str, Any], global_pool: str, cache_dir: str | os.PathLike[str] | None = None
    ) -> FeatureCache:
        from transferkit.models.create import PooledFeatures

        digest = backbone_digest(model, preprocessing, global_pool)
        row_shape = output_row_shape(PooledFeatures(model), preprocessing["input_size"])
        return cls(feature_cache_folder(cache_dir) / digest, row_shape=row_shape, fingerprint=digest)

    def _listing(self) -> list[Path]:
        try:
            if not self.folder.is_dir():
                return []
            self.checks.remove_stale_temporaries()
            return sorted(self.folder.glob("*.npz"))
        except OSError as error:
            warn_once(self.warns_as, "list", "feature cache: cannot read %s (%s); computing every feature",
                      self.folder, error)
            return []

    def _index(
        self, wanted: set[bytes], files: OpenFiles, compact: bool = True
    ) -> tuple[list[ShardRows | np.ndarray], dict[bytes, tuple[int, int]]]:
        """The shards holding some of ``wanted``, their files open in ``files`` by source index,
        and where each wanted digest's row lies: (source index, row). Every shard is checked
        first, each file closed again; only the shards holding wanted rows are opened to stay, so
        a folder shared by many datasets costs no more descriptors than the shards this run reads."""
        usable: list[tuple[np.ndarray, ShardRows]] = []
        for shard in self._listing():
            located = self.checks.locate(shard, self.row_shape or (usable[0][1].row_shape if usable else None))
            if located is not None:
                usable.append(located)
        partial = [(digests, rows) for digests, rows in usable if rows.rows < CHUNK]
        if compact and len(partial) > COMPACT_AT and merge_shards(partial, self.checks, self._write):
            remove_shards([rows.path for _, rows in partial])
            return self._index(wanted, files, compact=False)
        sources: list[ShardRows | np.ndarray] = []
        found: dict[bytes, tuple[int, int]] = {}
        for digests, rows in usable:
            here = [(digest, row) for row, digest in enumerate(d.tobytes() for d in digests)
                    if digest in wanted and digest not in found]
            if not here:
                continue
            # Opened only now, so a merge above needs one file at a time however many shards there are.
            descriptor = self.checks.open(rows)
            if descriptor is None:
                continue
            files.descriptors[len(sources)] = descriptor
            found.update((digest, (len(sources), row)) for digest, row in here)
            sources.append(rows)
        return sources, found

    def _write(
        self, digests: np.ndarray, blocks: Iterable[np.ndarray], rows: int, row_shape: tuple[int, ...]
    ) -> Path | None:
        """A new shard of ``rows`` rows, a block at a time; None, with one warning, where the
        folder cannot take it."""
        shard = self.folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                write_shard(handle, digests, blocks, rows, row_shape, self.dtype, self.fingerprint)

        try:
            atomic_write(shard, write)
        except OSError as error:  # read-only, full, or not a folder at all: the features still are right
            warn_once(self.warns_as, "write", "feature cache: cannot store features in %s (%s); they are "
                      "computed again next run; set --cache-dir or TRANSFERKIT_CACHE to a writable folder",
                      self.folder, error)
            return None
        return shard

    def store(self, paths: list[str], rows: np.ndarray, decoded: dict[str, bytes]) -> Path | None:
        """Rows of ``paths``, each under the digest of the bytes it came from (``decoded``), in a
        new shard, in that order, each digest once; also for rows a pass computed beside another
        cache's (``models.split.BottomAndPooled``)."""
        fresh = {decoded[path]: row for path, row in zip(paths, rows) if path in decoded}
        if not fresh:
            return None
        # Raw bytes, not a NumPy bytes string: that type drops trailing zero bytes, so one
        # digest in 256 would never match again.
        digests = np.frombuffer(b"".join(fresh), dtype=np.uint8).reshape(len(fresh), DIGEST_BYTES)
        return self._write(digests, fresh.values(), len(fresh), np.shape(rows)[1:])

    def _compute(
        self, paths: list[str], compute: Compute, sources: list[ShardRows | np.ndarray], files: OpenFiles
    ) -> tuple[dict[str, tuple[int, int]], dict[str, bytes]]:
        """Where the rows of ``paths`` now lie, (source index, row), and the digests of the bytes
        they came from; stored under those, and read back from the shard, so only the chunk
        being computed is ever in memory. Kept in memory where the cache cannot store them."""
        decoded: dict[str, bytes] = {}
        rows = np.asarray(compute(paths, decoded), dtype=self.dtype)
        if len(rows) != len(paths):
            raise RuntimeError(f"feature pass gave {len(rows)} rows for {len(paths)} images")
        if self.row_shape is not None and rows.shape[1:] != self.row_shape:
            raise RuntimeError(f"feature pass gave rows of shape {rows.shape[1:]}, where its model gives {self.row_shape}")
        cached_shape = row_shape_of(sources[0]) if sources else rows.shape[1:]
        self.row_shape = rows.shape[1:]
        if rows.shape[1:] != cached_shape:  # the shards read were not this model's: they go
            self.store(paths, rows, decoded)
            raise _ShapeChanged
        shard = self.store(paths, rows, decoded)
        located = (self.checks.locate(shard, self.row_shape) if shard is not None and all(path in decoded for path in paths)
                   else None)
        descriptor = self.checks.open(located[1], check=False) if located is not None else None  # written just now
        if located is None or descriptor is None:  # not stored, or merged away by another run already
            sources.append(rows)
            return {path: (len(sources) - 1, i) for i, path in enumerate(paths)}, decoded
        shard_rows = located[1]
        files.descriptors[len(sources)] = descriptor
        sources.append(shard_rows)
        slot = {digest: i for i, digest in enumerate(dict.fromkeys(decoded[path] for path in paths))}
        return {path: (len(sources) - 1, slot[decoded[path]]) for path in paths}, decoded

    def rows(self, paths: list[str], compute: Compute) -> tuple[CachedRows, FeatureStats]:
        """Rows for every path, in order, read from the cache's files when asked: the cached ones,
        and the rest computed (one ``compute`` a chunk, each distinct image once) and stored under
        the digest of the bytes they were computed from, never the one looked up: a file
        rewritten in between must not leave the new image's features under the old content."""
        try:
            return self._rows(paths, compute)
        except _ShapeChanged:
            return self._rows(paths, compute)

    def _rows(self, paths: list[str], compute: Compute) -> tuple[CachedRows, FeatureStats]:
        started = time.perf_counter()
        digests = content_digests(paths)
        files = OpenFiles()  # closes what it holds if anything below raises
        sources, known = self._index(set(digests), files)
        hits = sum(digest in known for digest in digests)
        source_of = np.full(len(paths), -1, np.int32)  # -1 until placed: CachedRows refuses a row without a source
        row_of = np.zeros(len(paths), np.int64)
        at_digest: dict[bytes, list[int]] = {}
        for position, digest in enumerate(digests):
            at_digest.setdefault(digest, []).append(position)

        def at_path(path: str) -> list[int]:  # only for files rewritten during the pass: rare
            return [position for position, other in enumerate(paths) if other == path]

        def place(positions: list[int], where: tuple[int, int]) -> None:
            source_of[positions], row_of[positions] = where

        for digest, where in known.items():
            place(at_digest[digest], where)
        missing: dict[bytes, str] = {}
        for path, digest in zip(paths, digests):
            if digest not in known:
                missing.setdefault(digest, path)
        pending = list(missing.items())
        # Stored a chunk at a time, so a pass killed at minute 20 of 25 keeps what it computed.
        for chunk in (dict(pending[start : start + CHUNK]) for start in range(0, len(pending), CHUNK)):
            computed, decoded = self._compute(list(chunk.values()), compute, sources, files)
            changed = set()
            for digest, path in chunk.items():
                if decoded.get(path) == digest:
                    place(at_digest[digest], computed[path])
                else:
                    changed.add(digest)
                    place(at_path(path), computed[path])
            if not changed:
                continue
            # Files that shared a rewritten file's old content each get their own row.
            again = [path for path, digest in zip(paths, digests) if digest in changed and path not in computed]
            if again:
                for path, where in self._compute(again, compute, sources, files)[0].items():
                    place(at_path(path), where)
        shape = row_shape_of(sources[0]) if sources else (0,)
        rows = CachedRows(shape, self.dtype, sources, files, source_of, row_of)
        stats = FeatureStats(images=len(paths), from_cache=hits, seconds=time.perf_counter() - started)
        log.info("%s: %d images, %d from the cache (%s), %.1f s", self.kind, len(paths), hits, self.folder, stats.seconds)
        return rows, stats

    def features(self, paths: list[str], compute: Compute) -> tuple[np.ndarray, FeatureStats]:
        """``rows`` of every path, read into memory: for pooled features, small enough to hold."""
        rows, stats = self.rows(paths, compute)
        return rows.numpy(), stats


def output_row_shape(module: Any, input_size: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one image's output row, from one forward of a blank image in eval mode
    (every module's mode restored after): what a cached shard's rows must have."""
    import torch

    modes = [(layer, layer.training) for layer in module.modules()]
    parameter = next(module.parameters(), None)
    try:
        with torch.inference_mode():
            output = module.eval()(torch.zeros(1, *input_size, device=parameter.device if parameter is not None else None))
    finally:
        for layer, training in modes:
            layer.training = training
    return tuple(output.shape[1:])
