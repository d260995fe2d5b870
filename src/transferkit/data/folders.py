"""Class folders: the classes and images of ``DATA/<class>/*`` and ``DATA/{train,val,test}/<class>/*``,
and ``discover``, which reads a folder or a manifest (``manifests``) into a ``DatasetIndex``."""

from __future__ import annotations

import os
from pathlib import Path

from transferkit._io import not_regular_reason
from transferkit.data.images import image_extensions
from transferkit.data.index import DatasetIndex
from transferkit.data.manifests import is_manifest, read_manifest, read_manifest_index
from transferkit.data.splits import carve_all, carve_validation, finish_splits, split_folders
from transferkit.errors import DataError

IGNORED_FILES = {"thumbs.db", "desktop.ini"}


def _visible(entry: os.DirEntry[str] | Path) -> bool:
    name = entry.name
    return not name.startswith(".") and name.lower() not in IGNORED_FILES


def _unlisted_reason(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "folder cannot be listed: permission denied; make it readable"
    return f"folder cannot be listed: {(error.strerror or type(error).__name__).lower()}"


def list_image_files(folder: Path, extensions: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files anywhere below ``folder`` (nested folders count) and the other files found;
    hidden files are ignored and symlinked folders are not followed, so a symlink loop cannot
    hang discovery. A folder that cannot be listed is listed as skipped: its images would
    otherwise vanish without a word."""
    images: list[str] = []
    skipped: list[tuple[str, str]] = []

    def unlisted(error: OSError) -> None:
        skipped.append((error.filename or str(folder), _unlisted_reason(error)))

    for current, dirs, files in os.walk(folder, onerror=unlisted, followlinks=False):
        linked = [d for d in dirs if os.path.islink(os.path.join(current, d))]
        skipped += [(os.path.join(current, d), "symbolic link to a folder, not followed") for d in sorted(linked)]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in linked)
        for name in sorted(files):
            if name.startswith(".") or name.lower() in IGNORED_FILES:
                continue
            path = os.path.join(current, name)
            if os.path.splitext(name)[1].lower() in extensions:
                reason = not_regular_reason(path)
                if reason:
                    skipped.append((path, reason))
                else:
                    images.append(path)
            else:
                skipped.append((path, "not an image file extension"))
    return images, skipped


def _class_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    by_lower: dict[str, list[str]] = {}
    for folder in folders:
        by_lower.setdefault(folder.name.lower(), []).append(folder.name)
    clashes = [names for names in by_lower.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" vs ".join(names) for names in clashes)
        raise DataError(
            f"class folders in {root} differ only in case ({listed}); merge or rename them, "
            "since they would be one class on Windows and macOS"
        )
    return folders


def _read_class_tree(root: Path, extensions: set[str]) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    folders = _class_folders(root)
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in extensions]
    if not folders:
        if loose:
            raise DataError(
                f"found {len(loose)} images directly in {root} but no class folders; "
                f"expected {root}/<class>/<image>.jpg, one folder per class"
            )
        raise DataError(
            f"no images found in {root}; expected {root}/<class>/<image>.jpg or "
            f"{root}/train/<class>/<image>.jpg"
        )
    classes: dict[str, list[str]] = {}
    skipped = [(str(p), "image outside any class folder") for p in loose]
    for folder in folders:
        images, ignored = list_image_files(folder, extensions)
        classes[folder.name] = images
        skipped += ignored
    return classes, skipped


def _check_classes(root: Path, classes: dict[str, list[str]]) -> None:
    total = sum(len(v) for v in classes.values())
    if total == 0:
        raise DataError(
            f"no images found in the class folders of {root} ({', '.join(classes)}); "
            "expected image files such as .jpg or .png inside them"
        )
    empty = [name for name, files in classes.items() if not files]
    if empty:
        from transferkit.data.images import check_image

        # Named together, so one fix covers all: a folder whose files all fail to decode is empty too
        # (a readable image ends each folder's look after one decode).
        unreadable = {name for name, files in classes.items() if files and all(map(check_image, files))}
        named = [f"{name} (no image files)" if name in empty else f"{name} ({len(files)} image files, none readable)"
                 for name, files in classes.items() if name in empty or name in unreadable]
        raise DataError(
            f"class folders with no usable images in {root}: {', '.join(named)}; add images or remove those folders"
        )
    if len(classes) < 2:
        only = next(iter(classes))
        raise DataError(
            f"only one class ({only!r}) found in {root}; a classifier needs at least two class folders"
        )


def discover(
    root: str | os.PathLike[str],
    split: tuple[float, float, float] = (0.8, 0.16, 0.04),
    seed: int = 42,
    max_per_class: int | None = None,
) -> DatasetIndex:
    """Find classes and images in a folder or a manifest (``manifests``); split them where the
    data gives no train / val split."""
    # Absolute paths in splits.csv keep a run folder usable from any working directory.
    root = Path(root).absolute()
    if is_manifest(root):
        return read_manifest_index(root, split, seed, max_per_class)
    if not root.is_dir():
        raise DataError(f"{root} not found; expected a folder {root}/<class>/<image>.jpg")
    extensions = image_extensions()
    split_dirs = split_folders(root)
    carved: dict[str, float] = {}
    if "train" in split_dirs:
        classes, splits, skipped = _read_split_folders(split_dirs, extensions)
        if "val" not in splits:
            # train/ + test/ only (chest X-rays): carve validation out of train, stratified.
            carved = carve_validation(splits, split, seed, classes)
        layout = "split-folders"
    else:
        tree, skipped = _read_class_tree(root, extensions)
        _check_classes(root, tree)
        classes = sorted(tree)
        splits, carved = carve_all({i: tree[c] for i, c in enumerate(classes)}, split, seed, classes)
        layout = "class-folders"
    splits = finish_splits(splits, max_per_class, seed)
    return DatasetIndex(root=root, classes=classes, splits=splits, skipped=skipped, layout=layout, carved=carved)


def _read_split_folders(
    split_dirs: dict[str, Path], extensions: set[str]
) -> tuple[list[str], dict[str, list[tuple[str, int]]], list[tuple[str, str]]]:
    """The classes (train's folders), each split's (path, label) items and the files skipped."""
    trees, skipped = {}, []
    for name, folder in split_dirs.items():
        trees[name], ignored = _read_class_tree(folder, extensions)
        skipped += ignored
    _check_classes(split_dirs["train"], trees["train"])
    classes = sorted(trees["train"])
    label_of = {name: i for i, name in enumerate(classes)}
    for name, tree in trees.items():
        unknown = sorted(set(tree) - set(classes))
        if unknown:
            raise DataError(
                f"{split_dirs[name]} has class folders that train/ lacks: {', '.join(unknown)}; "
                "every class needs training images"
            )
    splits = {name: [(f, label_of[c]) for c in classes for f in tree.get(c, [])] for name, tree in trees.items()}
    return classes, splits, skipped


def read_labelled_folder(
    root: str | os.PathLike[str], classes: list[str]
) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(path, label) pairs of ``root/<class>/*`` (or of every row of a manifest) labelled with a
    trained model's ``classes``.

    The folder may hold only some of the classes; a class the model does not know is an error
    that lists it, since its images could never be predicted right.
    """
    import difflib

    root = Path(root).absolute()
    if is_manifest(root):
        tree, skipped = read_manifest(root)
    elif not root.is_dir():
        raise DataError(f"{root} not found; expected a folder {root}/<class>/<image>.jpg")
    else:
        tree, skipped = _read_class_tree(root, image_extensions())
    unknown = sorted(set(tree) - set(classes))
    if len(unknown) == len(tree):
        raise DataError(
            f"none of the class folders in {root} ({', '.join(unknown)}) is a class the model knows "
            f"({', '.join(classes)}); evaluate a folder of those classes, or a run trained on these"
        )
    if unknown:
        # Only a near spelling is offered as a rename: a different class is not a typo of the closest name.
        renames = {name: difflib.get_close_matches(name, classes, n=1, cutoff=0.75) for name in unknown}
        named = [f"{name} (rename to {close[0]}?)" if close else name for name, close in renames.items()]
        raise DataError(
            f"class folders in {root} that the model was not trained on: {', '.join(named)}; "
            f"the model knows {', '.join(classes)}; rename or remove those folders"
        )
    label_of = {name: i for i, name in enumerate(classes)}
    items = [(path, label_of[name]) for name in sorted(tree, key=label_of.__getitem__) for path in tree[name]]
    return items, skipped
