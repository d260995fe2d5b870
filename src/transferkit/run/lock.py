"""One train per run folder: an exclusive ``flock`` the kernel releases however the process ends, so a killed run never blocks ``--resume``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from transferkit.errors import RunFolderError

LOCK_FILE = ".transferkit.lock"


@contextlib.contextmanager
def claim(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this process; refuse with one line when another process holds it."""
    lock = run_dir / LOCK_FILE
    try:
        # O_NOFOLLOW: a link planted as the lock file must not get its target truncated.
        handle = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
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


def training_process(run_dir: Path) -> str | None:
    """The pid of the train that holds ``run_dir``, or None when no process holds it."""
    try:
        # Neither a link nor a FIFO planted as the lock may make a reader follow or wait.
        handle = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        # Held for a moment only: a train claiming the folder in that moment is refused, as by a reader.
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(handle)
    return None


