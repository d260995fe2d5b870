"""A feature cache's rows, read from its shard files when asked instead of held in memory.

Boundary activations grow with the dataset past what a laptop's memory holds (benchmarks/RESULTS.md,
"Measurements behind defaults"); read from the shards the pass wrote, each batch's rows cost one
read from the OS's page cache, which keeps the files in memory where there is room and gives that
memory back where there is not. A shard's file stays open while its rows are read, so in this
process a run compacting the folder at the same time may remove the name, never the rows being
read (a process it is pickled to opens them by name; on Windows, which removes no open file, the
compacting run leaves the shard and says so).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from transferkit.cache.shard_file import ShardRows, open_shard, read_at


def row_shape_of(source: ShardRows | np.ndarray) -> tuple[int, ...]:
    """The shape of one row of a source of ``CachedRows``: a shard, or an array in memory."""
    return source.row_shape if isinstance(source, ShardRows) else tuple(source.shape[1:])



class OpenFiles:
    """Open shard files by source index, closed when the last ``CachedRows`` holding them goes
    (or, when building one fails, with the builder's frame)."""

    def __init__(self) -> None:
        self.descriptors: dict[int, int] = {}

    def close(self) -> None:
        for descriptor in self.descriptors.values():
            try:
                os.close(descriptor)
            except OSError:
                pass
        self.descriptors.clear()

    def __del__(self) -> None:
        self.close()


class CachedRows:
    """Rows of one shape, row i read from ``sources[source_of[i]]`` at row ``row_of[i]``, where a
    source is a shard on disk (its file open in ``files``) or an array in memory (rows a cache
    that could not be written keeps). Indexing gives a tensor; ``subset`` a view that shares the
    open files."""

    def __init__(
        self, row_shape: tuple[int, ...], dtype: np.dtype, sources: list[ShardRows | np.ndarray], files: OpenFiles,
        source_of: np.ndarray, row_of: np.ndarray,
    ):
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        for source in sources:
            if row_shape_of(source) != self.row_shape or source.dtype != self.dtype:
                raise ValueError(f"cached rows of shape {row_shape_of(source)} and type {source.dtype} among "
                                 f"{self.row_shape}, {self.dtype}")
        if len(source_of) and (source_of.min() < 0 or source_of.max() >= len(sources)):
            raise ValueError("a cached row without a source")
        self.sources = sources
        self.files = files
        self.source_of = source_of
        self.row_of = row_of

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    def __len__(self) -> int:
        return len(self.source_of)

    def subset(self, start: int, stop: int) -> CachedRows:
        view = object.__new__(CachedRows)
        view.__dict__.update(self.__dict__)
        view.source_of, view.row_of = self.source_of[start:stop], self.row_of[start:stop]
        return view

    def __getitem__(self, key: int | slice | np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.read(key))

    def numpy(self) -> np.ndarray:
        return self.read(slice(None))

    def read(self, key: int | slice | np.ndarray | torch.Tensor) -> np.ndarray:
        """Rows at ``key``: a position, a slice, or positions (one dimension of integers)."""
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, (int, np.integer)) or (isinstance(key, np.ndarray) and key.ndim == 0):
            position = int(key)
            if not -len(self) <= position < len(self):
                raise IndexError(f"row {position} of {len(self)}")
            # A copy: rows read from a file are read-only bytes, which torch warns about.
            return self._read_run(int(self.source_of[position]), int(self.row_of[position]), 1)[0].copy()
        if isinstance(key, slice):
            positions = np.arange(len(self))[key]
        else:
            positions = np.asarray(key)
            if positions.ndim != 1 or not (positions.dtype.kind in "iu" or positions.size == 0):
                raise TypeError(f"cached rows are read by position, not by {positions.dtype} of shape {positions.shape}")
        out = np.empty((len(positions), *self.row_shape), self.dtype)
        if not len(positions):
            return out
        sources, rows = self.source_of[positions], self.row_of[positions]
        order = np.lexsort((rows, sources))
        sources, rows = sources[order], rows[order]
        # One read for each run of consecutive rows of one source: a split read in order is a
        # few reads a shard, a shuffled batch one a row.
        starts = np.flatnonzero(np.r_[True, (np.diff(sources) != 0) | (np.diff(rows) != 1)])
        for start, stop in zip(starts, [*starts[1:], len(order)]):
            out[order[start:stop]] = self._read_run(int(sources[start]), int(rows[start]), int(stop - start))
        return out

    def _read_run(self, source_index: int, row: int, count: int) -> np.ndarray:
        source = self.sources[source_index]
        if isinstance(source, np.ndarray):
            return source[row : row + count]
        data = read_at(self.files.descriptors[source_index], count * source.row_bytes,
                        source.offset + row * source.row_bytes)
        return np.frombuffer(data, source.dtype).reshape(count, *self.row_shape)

    def __getstate__(self) -> dict[str, Any]:
        # Another process (a spawned DDP worker) opens the shards again by name.
        return {key: value for key, value in self.__dict__.items() if key != "files"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.files = OpenFiles()
        for index, source in enumerate(self.sources):
            if isinstance(source, ShardRows):
                self.files.descriptors[index] = open_shard(source.path)
