"""Merging a cache folder's small shards into one, so that a folder many runs added to stays quick to read."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from transferkit.cache.checks import ShardChecks
from transferkit.cache.shard_file import ShardRows
from transferkit.cache.shards import CachedRows, OpenFiles

log = logging.getLogger("transferkit.cache")  # one logger for the cache: users filter on it

COMPACT_AT = 8
"""Shards under a full chunk a folder may hold before they are merged: every run that computes
something adds one, and every run reads them all. Full chunks stay as they are: their number grows
with the images, not the runs, and merging them would rewrite every row."""

WriteShard = Callable[[np.ndarray, Iterable[np.ndarray], int, tuple[int, ...]], "Path | None"]
"""Writes a new shard of (digests, blocks of rows, row count, row shape); None where the folder refuses it."""


class _MergeReadError(Exception):
    """A shard being merged could not be read: not the folder refusing the merged one."""


def merge_shards(shards: list[tuple[np.ndarray, ShardRows]], checks: ShardChecks, write: WriteShard) -> bool:
    """One shard of the rows of ``shards``, each digest once (two cold runs store the same
    images twice), written a block at a time; False where it could not be written. The
    merged shard is in place before any shard it replaces goes, so nothing is lost to a
    kill; two runs compacting at once leave two shards, both correct. The shards are read one
    after another, each open only while read, so no limit on open files stops a merge."""
    digests = np.concatenate([digests for digests, _ in shards])
    _, first = np.unique(digests, axis=0, return_index=True)
    keep = np.sort(first)  # in the shards' order, so each shard's kept rows come together
    source_of = np.concatenate([np.full(rows.rows, i, np.int32) for i, (_, rows) in enumerate(shards)])[keep]
    row_of = np.concatenate([np.arange(rows.rows) for _, rows in shards])[keep]
    row_shape = shards[0][1].row_shape

    def blocks() -> Iterator[np.ndarray]:
        for i, (_, rows) in enumerate(shards):
            kept = row_of[source_of == i]
            if not len(kept):
                continue
            files = OpenFiles()
            try:
                descriptor = checks.open(rows)
                if descriptor is None:
                    raise _MergeReadError(f"{rows.path.name} is gone or unusable")
                files.descriptors[0] = descriptor
                one = CachedRows(row_shape, checks.dtype, [rows], files, np.zeros(len(kept), np.int32), kept)
                for start in range(0, len(kept), 256):
                    yield one.read(np.arange(start, min(start + 256, len(kept))))
            except OSError as error:  # a reading error, not the folder refusing the merged shard
                raise _MergeReadError(error) from error
            finally:
                files.close()

    try:
        written = write(digests[keep], blocks(), len(keep), row_shape) is not None
    except _MergeReadError as error:  # merged or removed by another run already
        log.info("feature cache: not merging the shards of %s (%s)", checks.folder, error)
        return False
    if written:
        log.info("feature cache: merged %d shards of %s into one (%d images)", len(shards), checks.folder, len(keep))
    return written


def remove_shards(shards: list[Path]) -> None:
    """The shards a merge replaced; one that cannot be removed is a duplicate, no more."""
    for shard in shards:
        try:
            shard.unlink(missing_ok=True)
        except OSError as error:  # another user's shard in a sticky shared folder
            log.info("feature cache: could not remove merged shard %s (%s)", shard, error)
