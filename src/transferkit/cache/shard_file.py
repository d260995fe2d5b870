"""A feature cache's shard file: written a block of rows at a time, located and checked before a row is read.

A shard is what ``np.savez`` writes, and ``np.load`` reads: an uncompressed zip of ``digests.npy``
and ``features.npy``. Its rows therefore lie in the file as one block in C order, which
``locate_shard`` finds from the zip entry's local header and the array's ``.npy`` header, and
which ``write_shard`` writes a block of rows at a time.

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
from typing import IO

import numpy as np

from transferkit._io import NotRegularFile, irregular_kind

_LOCAL_HEADER = struct.Struct("<4s22xHH")
"""A zip entry's local header: signature, then the name's and the extra field's lengths at 26."""
_MOST_AT_ONCE = 1 << 30
"""Bytes one read asks for: macOS refuses 2 GiB or more in one call, Windows reads at most that."""
_CHECKED_AT_ONCE = 1 << 24
"""Bytes read at a time to check a shard's checksum: a shard is checked without being held."""
DIGEST_BYTES = 32
"""A row's key: the SHA-256 of the image's bytes."""


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
    """What the rows came from, as the writer named it (its cache folder's key); None where the shard names none."""
    stored: tuple[int, int, int] = (0, 0, 0)
    """Where the zip entry of the rows starts in the file, its length and its CRC-32."""

    @cached_property  # read twice for every row a training step reads
    def row_bytes(self) -> int:
        # Python integers: a lying header's product must not wrap around to a small number.
        return math.prod(self.row_shape) * self.dtype.itemsize


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
        if dtype != np.uint8 or len(shape) != 2 or shape[1] != DIGEST_BYTES:
            raise DamagedShard(f"digests of shape {shape} and type {dtype}")
        length = shape[0] * DIGEST_BYTES
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
            crc = zlib.crc32(read_at(descriptor, min(_CHECKED_AT_ONCE, start + length - at), at), crc)
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


def read_at(descriptor: int, size: int, offset: int) -> bytes:
    """``size`` bytes of an open file from ``offset``, safe to call from several threads."""
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
