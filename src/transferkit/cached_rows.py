"""A feature cache's rows read from its shard files when asked, instead of held in memory.

Boundary activations are large: 57 KB an image with six blocks of EfficientNet-Lite0 unfrozen,
2.9 GB for cifar10's 50,000 training images. Held in a run's memory, they set its peak (7.0 GiB
there) and grow with the dataset past what a laptop has. Read from the shards the pass wrote, each
batch's rows cost one read from the OS's page cache, which keeps the files in memory where there
is room and gives that memory back where there is not.

A shard is an ``.npz`` that ``np.savez`` writes uncompressed, so its ``features`` array lies in the
file as one block of rows in C order; ``locate_shard`` finds where, from the zip entry's local
header and the array's ``.npy`` header. A shard's file stays open from the moment it is located:
a run compacting the folder at the same time may remove the name, never the rows being read.
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_LOCAL_HEADER = struct.Struct("<4s22xHH")
"""A zip entry's local header: signature, then the name's and the extra field's lengths at 26."""


@dataclass(frozen=True)
class ShardRows:
    """Where one shard's rows lie in its file."""

    path: Path
    offset: int
    rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))


def locate_shard(shard: Path) -> tuple[np.ndarray, ShardRows, int]:
    """The digests a shard holds, where its rows lie, and its file, open; ValueError (or zipfile's
    and NumPy's errors for a broken file) where it is not an uncompressed ``np.savez`` of
    ``digests`` and C-ordered ``features``; OSError where it cannot be read."""
    with zipfile.ZipFile(shard) as archive:
        with archive.open("digests.npy") as handle:
            digests = np.lib.format.read_array(handle, allow_pickle=False)
        entry = archive.getinfo("features.npy")
    if entry.compress_type != zipfile.ZIP_STORED:
        raise ValueError("features stored compressed")
    descriptor = _open(shard)
    try:
        with os.fdopen(os.dup(descriptor), "rb") as handle:
            handle.seek(entry.header_offset)
            signature, name_length, extra_length = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
            if signature != b"PK\x03\x04":
                raise ValueError("no local header where the zip directory points")
            handle.seek(entry.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(handle)
            offset = handle.tell()
        if fortran_order or dtype.hasobject or not shape:
            raise ValueError(f"features of shape {shape}, type {dtype}, fortran order {fortran_order}")
        rows = ShardRows(shard, offset, shape[0], tuple(shape[1:]), dtype)
        size = os.fstat(descriptor).st_size
        if offset + rows.rows * rows.row_bytes > size:
            raise ValueError(f"{size} bytes, too few for features of shape {shape}")
        if digests.ndim != 2 or len(digests) != rows.rows:
            raise ValueError(f"digests of shape {digests.shape} for {rows.rows} rows")
    except BaseException:
        os.close(descriptor)
        raise
    return digests, rows, descriptor


_seek_lock = threading.Lock()


def _read_at(descriptor: int, size: int, offset: int) -> bytes:
    if not hasattr(os, "pread"):  # Windows: one position per descriptor
        with _seek_lock:
            os.lseek(descriptor, offset, os.SEEK_SET)
            return os.read(descriptor, size)
    chunks = []
    while size:
        chunk = os.pread(descriptor, size, offset)
        if not chunk:
            raise OSError(f"a cached shard ends {size} bytes early")
        chunks.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(chunks)


class _OpenFiles:
    """The open shard files of a ``CachedRows`` and its subsets, closed when the last goes."""

    def __init__(self, descriptors: dict[int, int]):
        self.descriptors = descriptors
        """By source index."""

    def __del__(self) -> None:
        for descriptor in self.descriptors.values():
            try:
                os.close(descriptor)
            except OSError:
                pass


class CachedRows:
    """Rows of one shape, row i read from ``sources[source_of[i]]`` at row ``row_of[i]``, where a
    source is a shard on disk or an array in memory (rows a cache that could not be written
    keeps). Indexing gives a tensor; ``subset`` a view that shares the open files."""

    def __init__(
        self, row_shape: tuple[int, ...], dtype: np.dtype, sources: list[ShardRows | np.ndarray],
        descriptors: dict[int, int], source_of: np.ndarray, row_of: np.ndarray,
    ):
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.sources = sources
        self.files = _OpenFiles(descriptors)
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
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise IndexError(f"row {key} of {len(self)}")
            # A copy: rows read from a file are read-only bytes, which torch warns about.
            return self._read_run(int(self.source_of[key]), int(self.row_of[key]), 1)[0].copy()
        positions = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
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
        data = _read_at(self.files.descriptors[source_index], count * source.row_bytes,
                        source.offset + row * source.row_bytes)
        return np.frombuffer(data, source.dtype).reshape(count, *self.row_shape)

    def __getstate__(self) -> dict[str, Any]:
        # Another process (a spawned DDP worker) opens the shards again by name.
        return {key: value for key, value in self.__dict__.items() if key != "files"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.files = _OpenFiles({
            index: _open(source.path) for index, source in enumerate(self.sources) if isinstance(source, ShardRows)
        })
