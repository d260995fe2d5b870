"""Atomic file writes: a killed process never leaves a half-written file behind."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path``.

    The temporary file lives in the same folder, so the rename is atomic on POSIX and Windows.
    Its name is chosen before the file exists and the file is created inside the ``try``, so a
    Ctrl-C or SIGTERM raised anywhere leaves no file that the ``finally`` does not remove (with
    ``mkstemp`` a stop between its return and the ``try`` left one behind; a test caught it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        # 0600 while written, as mkstemp makes it; O_EXCL: never another process's file.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600))
        write(tmp)
        # A plain open() would follow the umask, so a cache or run folder shared by a team stays
        # readable by it.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as error:
        # A failing write() names no file and the rest name the temporary one: the user needs
        # to know which file a full disk cost them.
        if error.filename not in (None, os.fspath(tmp)):  # about another file: it keeps its name
            raise
        raise OSError(error.errno, error.strerror, os.fspath(path)) from error
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def stops_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM take effect when the block ends, not inside it, for work that must be
    whole or not at all (a checkpoint, an epoch's history row and its logger metrics). Raised inside
    a C++ library's callback a stop would come out as that library's RuntimeError (``torch.save``
    reports "unexpected pos"), and the code that keeps work on a stop would never see it."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    # Only the main thread runs handlers, and one installed outside Python cannot be put back.
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    received: list[int] = []
    with _stops_deferred():  # a stop between two swaps would leave one handler swapped for good
        for signum in previous:
            signal.signal(signum, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        with _stops_deferred():
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if received:  # delivered again, now to the handlers the block held it from
            signal.raise_signal(received[0])


@contextmanager
def _stops_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held by the kernel for the block, then delivered to the handlers it left
    (where the platform can hold them: POSIX)."""
    stops = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (setting it to read it
    would briefly give files made by other threads the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


# A Linux file name's bytes that are not UTF-8 are written back as the same bytes, so a listed path still opens.
PATH_ERRORS = "surrogateescape"


def write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors=PATH_ERRORS))


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``; a damaged file is a one-line ``RunFolderError`` naming it."""
    from transferkit.errors import RunFolderError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(
            f"{path} is damaged ({error}); restore it, or run again the command that wrote it"
        ) from None


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header; no rows when the file does not exist yet."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8", errors=PATH_ERRORS) as handle:
        return list(csv.DictReader(handle))


def write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8", errors=PATH_ERRORS) as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)


def write_csv_rows(path: str | os.PathLike[str], columns: list[str], rows: list[dict[str, Any]]) -> None:
    write_csv(path, columns, ([row.get(column, "") for column in columns] for row in rows))


def cache_home() -> Path:
    """Where transferkit keeps what it can rebuild: $TRANSFERKIT_CACHE, else the user's cache folder."""
    if os.environ.get("TRANSFERKIT_CACHE"):
        return Path(os.environ["TRANSFERKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferkit"


def update_with_tensors(digest: Any, named_tensors: Iterable[tuple[str, Any]]) -> None:
    """Feed each tensor's name, shape, dtype and bytes to a hashlib ``digest``."""
    for name, tensor in named_tensors:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())


FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


class NotRegularFile(OSError):
    """A FIFO, device or socket where a file was expected: reading it could block forever or never end."""


def irregular_kind(mode: int) -> str | None:
    """None for a regular file, else what it is ("a FIFO", ...)."""
    return None if stat.S_ISREG(mode) else FILE_KINDS.get(stat.S_IFMT(mode), "not a file")


def not_regular_reason(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is no file to read (a FIFO would block a reader forever, /dev/zero never
    ends), found without opening it; None for a regular file or one that cannot be looked at,
    whose reason the decoder gives."""
    try:
        kind = irregular_kind(os.stat(path).st_mode)
    except OSError:
        return None
    return f"not a regular file ({kind})" if kind else None


def open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """``open(path, "rb")`` that refuses anything but a regular file, before reading a byte.

    Non-blocking, so opening a FIFO with no writer returns at once instead of waiting forever;
    the flag changes nothing for a regular file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        kind = irregular_kind(os.fstat(fd).st_mode)
        if kind == "a folder":
            raise IsADirectoryError(errno.EISDIR, "a folder, not a file", os.fsdecode(path))
        if kind:
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({kind})", os.fsdecode(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def content_digest(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> bytes:
    """SHA-256 of a file's bytes: the same image under any name or folder has one digest."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.digest()


def content_digests(paths: list[str], threads: int = 4) -> list[bytes]:
    # hashlib releases the GIL on large buffers, so threads overlap reading and hashing.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(content_digest, paths))
