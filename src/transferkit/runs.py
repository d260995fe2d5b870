"""Claiming a run folder, so that two trains never write into the same one.

A run folder is claimed with an exclusive ``flock`` on a lock file inside it, held while the
process runs. The kernel releases the lock when the process ends in any way (SIGKILL included),
so a killed run never leaves a stale claim that blocks ``--resume``; a second ``train`` into the
same ``--output`` is refused at once instead of mixing its config with the first run's history,
metrics and model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from transferkit.errors import RunFolderError

LOCK_FILE = ".transferkit.lock"
WORK_FILES = ("progress.json", "metrics.json", "history.csv")
"""What a run has produced once it has trained; a folder with only the files written at the start
(config, splits) holds a start that failed before any work and may be reused."""


def prepare_folder(run_dir: Path) -> None:
    """Create ``run_dir``, or say in one line why it cannot be a run folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--output {run_dir} is an existing file, not a folder; choose another --output")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(
            f"cannot create the run folder {run_dir} ({error.strerror}); choose another --output"
        ) from None


@contextlib.contextmanager
def claim(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this process; refuse with one line when another process holds it."""
    lock = run_dir / LOCK_FILE
    try:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise RunFolderError(
            f"cannot write to the run folder {run_dir} ({error.strerror}); choose another --output"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunFolderError(
                f"{run_dir} is being written by another transferkit process (pid {holder}); "
                "wait for it to finish, or choose another --output"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        # Only a process killed mid-write (SIGKILL, power loss) leaves a temporary file, and no one
        # else can be writing now: they are leftovers.
        for stale in run_dir.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def holds_work(run_dir: Path) -> bool:
    """Whether an earlier train in ``run_dir`` got as far as training (a checkpoint or a result)."""
    return any((run_dir / name).is_file() for name in WORK_FILES) or any((run_dir / "checkpoints").glob("*.ckpt"))
