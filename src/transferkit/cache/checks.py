"""Whether a feature cache's shard may be used, and what becomes of one that may not.

Nothing read from disk is trusted. A shard must be a regular file (``shard_file.open_shard``),
its headers must fit in its size (``shard_file.locate_shard``), the rows a run reads must have
the CRC-32 the zip recorded (``shard_file.check_rows``), and they must be of the type, shape
and fingerprint this run's model gives. One that is not is moved aside once
(``*.unreadable``) with one warning, and the cache computes its rows again, so a run on a
damaged or foreign cache ends as a run on a clean one does. Temporary shards a killed writer
left are removed here too.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import numpy as np

from transferkit._io import NotRegularFile
from transferkit.cache.shard_file import DamagedShard, ShardRows, check_rows, locate_shard, open_shard

log = logging.getLogger("transferkit.cache")  # one logger for the cache: users filter on it

STALE_AFTER = 3600.0
"""Seconds after its last write that a temporary shard is a killed writer's leftover: a live
writer writes a block at a time, so its file is never that old."""

OLD_SHARD = "written by a transferkit that recorded no fingerprint of the model"

_warned: set[tuple[str, str]] = set()


def warn_once(folder: Path, kind: str, message: str, *args: object) -> None:
    """One warning per cache folder and kind of trouble in a process: a compare of many runs says it once."""
    if (str(folder), kind) not in _warned:
        _warned.add((str(folder), kind))
        log.warning(message, *args)


class ShardChecks:
    """The checks of one cache folder's shards, against what this cache's rows must be."""

    def __init__(self, folder: Path, dtype: np.dtype, fingerprint: str):
        self.folder = folder
        self.dtype = dtype
        self.fingerprint = fingerprint

    def problem(self, rows: ShardRows, row_shape: tuple[int, ...] | None) -> str | None:
        """Why a well-formed shard's rows are not this cache's, or None."""
        if rows.fingerprint != self.fingerprint:
            return (f"rows of another model, preprocessing or boundary ({rows.fingerprint})" if rows.fingerprint
                    else OLD_SHARD)
        if rows.dtype != self.dtype:
            return f"rows of type {rows.dtype}, where this cache keeps {self.dtype}"
        if row_shape is not None and rows.row_shape != row_shape:
            return f"rows of shape {rows.row_shape}, where this model gives {row_shape}"
        return None

    def set_aside(self, shard: Path, reason: object, once: tuple[Path, str] | None = None) -> None:
        """Moved aside with one warning (for the shard, or for each folder and kind in ``once``), so
        the next run neither trips on it nor warns again."""
        aside = shard.with_name(shard.name + ".unreadable")
        try:
            os.replace(shard, aside)
            done = f"moved it aside to {aside.name}"
        except FileNotFoundError:  # a run going on at the same time moved or merged it first
            return
        except OSError:
            done = "delete it"
        if once:
            warn_once(*once, "feature cache: ignoring the shards of %s %s; %s, and their rows are computed again",
                      self.folder, reason, done.replace(aside.name, "*.unreadable"))
        else:
            warn_once(shard, "read", "feature cache: ignoring unusable shard %s (%s); %s, and its rows are computed "
                      "again", shard, reason, done)

    def unopenable(self, shard: Path, error: OSError) -> None:
        """A shard that could not be opened, not ours to remove: another user's, a failing disk,
        or too many files open at once (one warning for the folder, with the fix)."""
        if error.errno in (errno.EMFILE, errno.ENFILE):
            warn_once(self.folder, "files", "feature cache: too many open files to read the shards of %s (%s); "
                      "their rows are computed again; raise the limit on open files (ulimit -n)", self.folder, error)
        else:
            warn_once(shard, "read", "feature cache: ignoring unreadable shard %s (%s); make it readable",
                      shard, error)

    def locate(self, shard: Path, row_shape: tuple[int, ...] | None) -> tuple[np.ndarray, ShardRows] | None:
        """``shard_file.locate_shard``, or None for a shard that is gone or cannot be used; a
        damaged shard, or one of rows another model gave, is moved aside."""
        try:
            digests, rows = locate_shard(shard)
        except FileNotFoundError:  # merged into another shard by a run going on at the same time
            return None
        except (DamagedShard, NotRegularFile) as error:
            self.set_aside(shard, error)
            return None
        except OSError as error:
            self.unopenable(shard, error)
            return None
        problem = self.problem(rows, row_shape)
        if problem:
            # Every shard of a cache written before shards had fingerprints: one line for the folder.
            self.set_aside(shard, problem, (self.folder, "old") if problem == OLD_SHARD else None)
            return None
        return digests, rows

    def open(self, rows: ShardRows, check: bool = True) -> int | None:
        """The located shard's file, open, its rows' checksum checked; None where it is gone or
        cannot be used."""
        try:
            descriptor = open_shard(rows.path)
        except FileNotFoundError:  # merged away by a run going on at the same time: computed again
            return None
        except NotRegularFile as error:  # swapped for a FIFO or a device since it was located
            self.set_aside(rows.path, error)
            return None
        except OSError as error:
            self.unopenable(rows.path, error)
            return None
        try:
            if check:
                check_rows(descriptor, rows)
        except DamagedShard as error:
            os.close(descriptor)
            self.set_aside(rows.path, error)
            return None
        except OSError as error:  # a failing disk: not the shard's bytes, so not moved aside
            os.close(descriptor)
            self.unopenable(rows.path, error)
            return None
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor

    def remove_stale_temporaries(self) -> None:
        """Shards a killed writer left half-written (``atomic_write``'s ``.{name}.{hex}.tmp``).
        By age, not by lock: a live writer's file is written a block at a time, and an age works
        on every OS and file system, where locks do not (NFS, Windows)."""
        now = time.time()
        for tmp in self.folder.glob(".*.npz.*.tmp"):
            try:
                if now - tmp.lstat().st_mtime > STALE_AFTER:
                    tmp.unlink()
                    log.info("feature cache: removed %s, left by a writer that was killed", tmp)
            except OSError:  # gone already, or another user's in a shared folder
                pass
