"""``--exclude FILE.csv``: images a user chose to leave out, listed by path in any CSV file
with a ``path`` column (an audit's audit.csv, filtered by hand, is one)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from transferkit._io import PATH_ERRORS
from transferkit.errors import DataError

log = logging.getLogger(__name__)


def read_exclusions(listing: str | os.PathLike[str], root: Path, known: set[str]) -> dict[str, str]:
    """{path: reason} for every image of ``known`` (absolute paths) that ``listing`` names.

    A listed path may be absolute, or relative to the data folder ``root`` or to the working
    folder. The reason names the file, and the audit's finding where the CSV has a ``kind``
    column. Listed paths that are not among ``known`` are counted in the log, not an error: the
    list may be from another split or an older copy of the folder.
    """
    listing = Path(listing)
    try:
        # utf-8-sig: Excel's "CSV UTF-8" begins with a byte-order mark, else part of the first column's name.
        with listing.open(newline="", encoding="utf-8-sig", errors=PATH_ERRORS) as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []
    except FileNotFoundError:
        raise DataError(f"{listing} not found; --exclude takes a CSV file with a path column, such as an audit's audit.csv") from None
    except (OSError, csv.Error) as error:
        raise DataError(f"cannot read {listing} ({error}); --exclude takes a CSV file with a path column") from None
    if "path" not in columns:
        shown = printable(", ".join(columns[:8]))[:160] or "none"
        raise DataError(f"{listing} has no path column (its columns: {shown}); --exclude needs one naming each image to leave out")
    # The index keeps paths as given (``../data/x.jpg`` made absolute keeps its ``..``): match
    # on the normalised form and answer with the index's own spelling.
    normalised = {os.path.normpath(path): path for path in known}
    reasons: dict[str, list[str]] = {}
    missing = elsewhere = outside = 0
    for row in rows:
        listed = (row.get("path") or "").strip()
        path = _match(listed, root, normalised)
        if path is None:
            if listed:
                inside = [candidate for candidate in _candidates(listed, root) if _is_inside(candidate, root)]
                # A file that exists but is not among these images was left out already (skipped,
                # or not in the split --splits-from reuses); only a path naming nothing is suspect.
                exists = any(candidate.is_file() for candidate in inside)
                outside += not inside
                elsewhere += exists
                missing += bool(inside) and not exists
            continue
        kinds = reasons.setdefault(path, [])
        kind = printable((row.get("kind") or "").strip())
        if kind and kind not in kinds:
            kinds.append(kind)
    if missing:
        log.warning("%d paths listed in %s name no file (in %s or the working folder); they are ignored",
                    missing, listing, root)
    if outside:
        log.warning("%d paths listed in %s are outside the data folder %s; they are ignored",
                    outside, listing, root)
    if elsewhere:
        log.info("%d images listed in %s are not among this run's images (left out already)", elsewhere, listing)
    return {
        path: f"excluded by {listing.name}" + (f" ({', '.join(kinds)})" if kinds else "")
        for path, kinds in reasons.items()
    }


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``) and undecodable bytes shown as the
    bytes they were (``\\xff``): a CSV's content quoted in a message must not drive the terminal."""

    def shown(char: str) -> str:
        if char.isprintable():
            return char
        if "\udc80" <= char <= "\udcff":  # a byte that was not UTF-8, carried by surrogateescape
            return f"\\x{ord(char) - 0xDC00:02x}"
        return repr(char)[1:-1]

    return "".join(shown(char) for char in text)


def _is_inside(candidate: Path, root: Path) -> bool:
    # Lexical, so that deciding never looks at the disk outside ``root``.
    folder = os.path.normpath(os.path.abspath(root))
    return os.path.normpath(os.path.abspath(candidate)).startswith(folder.rstrip(os.sep) + os.sep)


def _candidates(listed: str, root: Path) -> tuple[Path, ...]:
    return Path(listed), root / listed, Path.cwd() / listed


def _match(listed: str, root: Path, normalised: dict[str, str]) -> str | None:
    if not listed:
        return None
    for candidate in _candidates(listed, root):
        path = os.path.normpath(os.path.abspath(candidate))
        if path in normalised:
            return normalised[path]
    return None
