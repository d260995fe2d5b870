"""A feature cache's shard files, and its rows read from them when asked instead of held in memory.

Boundary activations are large: 57 KB an image with six blocks of EfficientNet-Lite0 unfrozen,
2.9 GB for cifar10's 50,000 training images. Held in a run's memory, they set its peak (7.0 GiB
there) and grow with the dataset past what a laptop has. Read from the shards the pass wrote, each
batch's rows cost one read from the OS's page cache, which keeps the files in memory where there
is room and gives that memory back where there is not.

A shard is what ``np.savez`` writes, and ``np.load`` reads: an uncompressed zip of ``digests.npy``
and ``features.npy``. Its rows therefore lie in the file as one block in C order, which
``locate_shard`` finds from the zip entry's local header and the array's ``.npy`` header, and
which ``write_shard`` writes a block of rows at a time. A shard's file stays open while its
rows are read, so in this process a run compacting the folder at the same time may remove the
name, never the rows being read (a process it is pickled to opens them by name; on Windows,
which removes no open file, the compacting run leaves the shard and says so).

Nothing read from a shard is trusted: it must be a regular file, every size its headers claim
must fit in the file before anything is allocated, and the zip comment records what the rows
came from (``fingerprint``), which the cache compares with its own before using a row.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from transferkit._io import NotRegularFile, irregular_kind

_LOCAL_HEADER = struct.Struct("<4s22xHH")
"""A zip entry's local header: signature, then the name's and the extra field's lengths at 26."""
_MOST_AT_ONCE = 1 << 30
"""Bytes one read asks for: macOS refuses 2 GiB or more in one call, Windows reads at most that."""
_CHECKED_AT_ONCE = 1 << 24
"""Bytes read at a time to check a shard's checksum: a shard is checked without being held."""
_DIGEST_BYTES = 32


class DamagedShard(ValueError):
    """A shard whose bytes are not what a shard holds: truncated, overwritten or lying in a header."""


@dataclass(frozen=True)
class ShardRows:
    """Where one shard's rows lie in its file."""

    path: Path
    offset: int
    rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    fingerprint: str | None = None
    """What the rows came from, as the writer named it (its cache folder's key); None in a shard
    written before shards recorded it."""
    stored: tuple[int, int, int] = (0, 0, 0)
    """Where the zip entry of the rows starts in the file, its length and its CRC-32."""

    @cached_property  # read twice for every row a training step reads
    def row_bytes(self) -> int:
        # Python integers: a lying header's product must not wrap around to a small number.
        return math.prod(self.row_shape) * self.dtype.itemsize


def row_shape_of(source: ShardRows | np.ndarray) -> tuple[int, ...]:
    """The shape of one row of a source of ``CachedRows``: a shard, or an array in memory."""
    return source.row_shape if isinstance(source, ShardRows) else tuple(source.shape[1:])


def open_shard(path: Path) -> int:
    """A shard's file, open for reading; ``NotRegularFile`` for a FIFO, device, socket or folder,
    found before a byte is read: /dev/zero never ends, and a FIFO without a writer blocks a
    reader forever (non-blocking, its open returns at once)."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        kind = irregular_kind(os.fstat(descriptor).st_mode)
        if kind:
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({kind})", os.fsdecode(path))
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _read_array_header(handle: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and type a ``.npy`` header gives, refused unless C-ordered plain numbers."""
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(handle)
    if fortran_order or dtype.hasobject or not shape or min(shape) < 0:
        raise DamagedShard(f"an array of shape {shape}, type {dtype}, fortran order {fortran_order}")
    return tuple(shape), dtype


def _read_digests(archive: zipfile.ZipFile, size: int) -> np.ndarray:
    """``digests.npy``, its length checked against the file's before anything is allocated:
    NumPy would allocate whatever its header claims (291 TiB for a 300-byte file)."""
    with archive.open("digests.npy") as member:
        shape, dtype = _read_array_header(member)
        if dtype != np.uint8 or len(shape) != 2 or shape[1] != _DIGEST_BYTES:
            raise DamagedShard(f"digests of shape {shape} and type {dtype}")
        length = shape[0] * _DIGEST_BYTES
        if length > size:
            raise DamagedShard(f"digests of shape {shape} in a file of {size} bytes")
        data = member.read(length)
        # Reading to the entry's end makes zipfile check its CRC-32.
        if len(data) != length or member.read(1):
            raise DamagedShard(f"digests of shape {shape} in an entry of another length")
    return np.frombuffer(data, np.uint8).reshape(shape)


def _parse_shard(shard: Path, descriptor: int) -> tuple[np.ndarray, ShardRows]:
    """``locate_shard`` on the open file: every offset and length checked against its size."""
    size = os.fstat(descriptor).st_size
    with os.fdopen(os.dup(descriptor), "rb") as handle:
        with zipfile.ZipFile(handle) as archive:
            digests = _read_digests(archive, size)
            entry = archive.getinfo("features.npy")
            comment = archive.comment
        if entry.compress_type != zipfile.ZIP_STORED or entry.flag_bits & 0x1:
            raise DamagedShard("features stored compressed or encrypted")
        handle.seek(entry.header_offset)
        header = handle.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size:
            raise DamagedShard("the zip directory points past the end of the file")
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != b"PK\x03\x04":
            raise DamagedShard("no local header where the zip directory points")
        start = entry.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        handle.seek(start)
        shape, dtype = _read_array_header(handle)
        offset = handle.tell()
    rows = ShardRows(shard, offset, shape[0], shape[1:], dtype, _fingerprint(comment),
                     (start, entry.compress_size, entry.CRC))
    if offset + rows.rows * rows.row_bytes > min(size, start + entry.compress_size):
        raise DamagedShard(f"{size} bytes, too few for features of shape {shape}")
    if len(digests) != rows.rows:
        raise DamagedShard(f"digests of shape {digests.shape} for {rows.rows} rows")
    return digests, rows


def _fingerprint(comment: bytes) -> str | None:
    try:
        recorded = json.loads(comment.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    fingerprint = recorded.get("fingerprint") if isinstance(recorded, dict) else None
    return fingerprint if isinstance(fingerprint, str) else None


def locate_shard(shard: Path) -> tuple[np.ndarray, ShardRows]:
    """The digests a shard holds and where its rows lie; ``DamagedShard`` where it is not an
    uncompressed zip of ``digests`` and C-ordered ``features`` that fit in the file,
    ``NotRegularFile`` where it is no file, OSError where it cannot be read."""
    descriptor = open_shard(shard)
    try:
        return _parse_shard(shard, descriptor)
    except OSError as error:
        if error.errno not in (None, errno.EINVAL):  # the disk or the permissions, not the bytes
            raise
        raise DamagedShard(str(error) or type(error).__name__) from error
    except Exception as error:  # zipfile and NumPy raise a dozen kinds on bytes they cannot parse
        raise DamagedShard(f"{type(error).__name__}: {error}") from error
    finally:
        os.close(descriptor)


def check_rows(descriptor: int, rows: ShardRows) -> None:
    """``DamagedShard`` unless the bytes of the shard's rows have the CRC-32 its zip recorded:
    a row overwritten on disk is as wrong as a lying header, and quieter."""
    start, length, expected = rows.stored
    crc = 0
    try:
        for at in range(start, start + length, _CHECKED_AT_ONCE):
            crc = zlib.crc32(_read_at(descriptor, min(_CHECKED_AT_ONCE, start + length - at), at), crc)
    except OSError as error:
        if error.errno is not None:
            raise
        raise DamagedShard(str(error)) from error
    if crc != expected:
        raise DamagedShard(f"rows whose CRC-32 is {crc:08x}, where the zip recorded {expected:08x}")


def write_shard(
    handle: IO[bytes], digests: np.ndarray, blocks: Iterable[np.ndarray], rows: int, row_shape: tuple[int, ...],
    dtype: np.dtype, fingerprint: str,
) -> None:
    """A shard as ``np.savez`` writes it, its ``rows`` rows written a block at a time as
    ``blocks`` yields them, so a merge of shards never holds them all; ``fingerprint`` (what the
    rows came from) in the zip comment, which ``np.load`` ignores."""
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.comment = json.dumps({"fingerprint": fingerprint}).encode("ascii")
        with archive.open("digests.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, digests, allow_pickle=False)
        with archive.open("features.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": (rows, *row_shape)}
            np.lib.format.write_array_header_1_0(member, header)
            written = 0
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                if block.shape == tuple(row_shape):  # one row
                    block = block[None]
                if block.shape[1:] != tuple(row_shape):
                    raise ValueError(f"a block of shape {block.shape} in a shard of rows of shape {row_shape}")
                member.write(memoryview(block.view(np.uint8).reshape(-1)))
                written += len(block)
            if written != rows:
                raise ValueError(f"{written} rows written to a shard of {rows}")


_seek_lock = threading.Lock()


def _read_at(descriptor: int, size: int, offset: int) -> bytes:
    chunks = []
    while size:
        wanted = min(size, _MOST_AT_ONCE)
        if hasattr(os, "pread"):
            chunk = os.pread(descriptor, wanted, offset)
        else:  # Windows: one position per descriptor
            with _seek_lock:
                os.lseek(descriptor, offset, os.SEEK_SET)
                chunk = os.read(descriptor, wanted)
        if not chunk:
            raise OSError(f"a cached shard ends {size} bytes early")
        chunks.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(chunks)


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
        data = _read_at(self.files.descriptors[source_index], count * source.row_bytes,
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
