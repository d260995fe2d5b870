"""Where a run may write: a folder that can be one, and only inside it, never through a link out of it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transferkit.errors import RunFolderError


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


def writable_inside(root: Path, path: Path) -> Path:
    """``path`` (inside ``root``), once sure that writing it stays inside: a link on the way
    that leads out (``model`` to another run's model) is refused in one line, its target untouched."""
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved == resolved_root or resolved_root in resolved.parents:
        return path
    parts = path.relative_to(root).parts
    steps = (root.joinpath(*parts[: i + 1]) for i in range(len(parts)))
    link = next((step for step in steps if step.is_symlink()), path)
    raise RunFolderError(
        f"{link} is a link to {link.resolve()}, outside the run folder {root}; a run writes only "
        "inside its folder: remove the link (what it leads to is kept), or choose another --output"
    )


def refuse_links_out(root: Path, names: Iterable[str]) -> None:
    """Refuse a folder where an entry ``names`` lists, or an evaluation, is a link leading out of it.

    Refused rather than replaced by a real folder: the link is the user's doing, and asking
    loses nothing, while replacing it would quietly split their files between two places.
    """
    evaluations = root / "evaluation"
    entries = [root / name for name in (*names, "evaluation")]
    if evaluations.is_dir() and not evaluations.is_symlink():
        entries += evaluations.iterdir()
    for entry in entries:
        if entry.is_symlink():
            writable_inside(root, entry)
