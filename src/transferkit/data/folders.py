"""Image folders: discovery of classes and images, the ``DatasetIndex``, seeded stratified splits
and byte-identical duplicates."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from transferkit._io import content_digests, not_regular_reason, read_csv_rows, write_csv
from transferkit.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
IGNORED_FILES = {"thumbs.db", "desktop.ini"}


def image_extensions() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


@dataclass
class DatasetIndex:
    """What was found in an image folder, split into train / val / test."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) for every file that is not used."""
    layout: str = "class-folders"
    duplicates: list[list[tuple[str, str, int]]] = field(default_factory=list)
    """Groups of byte-identical images found in the splits, each as (split, path, label)."""
    carved: dict[str, float] = field(default_factory=dict)
    """The splits cut from one folder and each one's fraction (empty where the folders were given)."""
    groups: dict[str, str] = field(default_factory=dict)
    """Each image's group (images of one group share a split), where groups were made."""

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {self.classes[k]: v for k, v in sorted(Counter(label for _, label in items).items())}
            for split, items in self.splits.items()
        }

    def targets(self, split: str) -> list[int]:
        return [label for _, label in self.splits[split]]

    def drop(self, reasons: dict[str, str]) -> None:
        """Remove files (unreadable, duplicates) from every split and list them as skipped."""
        if not reasons:
            return
        for split, items in list(self.splits.items()):
            self.splits[split] = [(path, label) for path, label in items if path not in reasons]
            if split == "test" and not self.splits[split]:
                del self.splits[split]  # a small test split of broken files: the run goes on without one
        self.skipped.extend(sorted(reasons.items()))
        for split in ("train", "val"):
            present = {label for _, label in self.splits[split]}
            missing = [self.classes[k] for k in range(len(self.classes)) if k not in present]
            if missing:
                raise DataError(
                    f"after skipping {len(reasons)} unreadable, duplicate or excluded files, the {split} split has no "
                    f"images of {', '.join(missing)}; add readable images to those class folders"
                )

    def find_duplicates(self) -> None:
        """Group byte-identical images (by content hash) into ``duplicates``."""
        entries = [(split, path, label) for split, items in self.splits.items() for path, label in items]
        groups: dict[bytes, list[tuple[str, str, int]]] = {}
        for entry, digest in zip(entries, content_digests([path for _, path, _ in entries])):
            groups.setdefault(digest, []).append(entry)
        self.duplicates = [group for group in groups.values() if len(group) > 1]

    def duplicate_kinds(self) -> dict[str, int]:
        """How many groups leak across splits, and how many file one image under two classes."""
        return {
            "groups": len(self.duplicates),
            "across_splits": sum(len({split for split, _, _ in group}) > 1 for group in self.duplicates),
            "across_classes": sum(len({label for _, _, label in group}) > 1 for group in self.duplicates),
        }

    def drop_duplicates(self) -> int:
        """Keep one copy of each group, the first in train / val / test order; drop every copy of an
        image filed under two classes, whose label cannot be trusted. Returns the files dropped."""
        reasons: dict[str, str] = {}
        for group in self.duplicates:
            classes = sorted({self.classes[label] for _, _, label in group})
            if len(classes) > 1:
                for _, path, _ in group:
                    reasons[path] = f"duplicate: the same image is filed under {' and '.join(classes)}"
                continue
            keep = min(group, key=lambda entry: SPLITS.index(entry[0]))
            for _, path, _ in group:
                if path != keep[1]:
                    reasons[path] = f"duplicate of {keep[1]}"
        self.drop(reasons)
        return len(reasons)

    def carve_by_groups(self, groups: dict[str, str], seed: int, max_per_class: int | None = None) -> None:
        """Cut the carved splits again so that each group of ``groups`` (path: key) is on one side,
        then keep at most ``max_per_class`` images per class in each, as ``discover`` did."""
        from transferkit.data.groups import grouped_split

        names = [name for name in SPLITS if name in self.carved]
        pool = [item for name in names for item in self.splits.get(name, [])]
        self.groups = dict(groups)
        if len({groups[path] for path, _ in pool}) == len(pool):
            return  # nothing to keep together: the random split stands, as before groups existed
        parts = grouped_split([label for _, label in pool], [groups[path] for path, _ in pool],
                              [self.carved[name] for name in names], seed, self.classes)
        for number, name in enumerate(names):
            self.splits[name] = [item for item, part in zip(pool, parts) if part == number]
        if not self.splits["val"]:
            raise DataError(
                f"every class's images form one group ({len(set(groups.values()))} groups in all), so no image is "
                "left for validation; give the groups with --group-by, or split at random with --split-groups none"
            )
        self.splits = {name: self.splits[name] for name in SPLITS if self.splits.get(name)}
        if max_per_class is not None:
            self.splits = {name: _limit_per_class(items, max_per_class, seed) for name, items in self.splits.items()}
        split_of = {file: name for name, items in self.splits.items() for file, _ in items}
        self.duplicates = [[(split_of.get(file, name), file, label) for name, file, label in group]
                           for group in self.duplicates]

    def write_splits(self, path: Path) -> None:
        rows = ([split, file, label, self.classes[label], self.groups.get(file, "")]
                for split, items in self.splits.items() for file, label in items)
        write_csv(path, ["split", "path", "label", "class", "group"], rows)

    def write_duplicates(self, path: Path) -> None:
        rows = (
            [number, split, self.classes[label], file]
            for number, group in enumerate(self.duplicates, 1)
            for split, file, label in group
        )
        write_csv(path, ["group", "split", "class", "path"], rows)

    def read_duplicates(self, path: Path) -> None:
        groups: dict[str, list[tuple[str, str, int]]] = {}
        for row in read_csv_rows(path):
            groups.setdefault(row["group"], []).append((row["split"], row["path"], self.classes.index(row["class"])))
        self.duplicates = list(groups.values())

    def write_skipped(self, path: Path) -> None:
        write_csv(path, ["path", "reason"], self.skipped)

    @classmethod
    def read_splits(cls, root: Path, classes: list[str], path: Path) -> DatasetIndex:
        splits: dict[str, list[tuple[str, int]]] = {}
        groups: dict[str, str] = {}
        for row in read_csv_rows(path):
            splits.setdefault(row["split"], []).append((row["path"], int(row["label"])))
            if row.get("group"):  # run folders before groups have no such column
                groups[row["path"]] = row["group"]
        return cls(root=root, classes=classes, splits=splits, groups=groups)


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


def _stratified_split(
    by_class: dict[int, list[str]], fractions: tuple[float, ...], seed: int, classes: list[str]
) -> list[list[tuple[str, int]]]:
    """Split each class on its own so every split keeps the class proportions."""
    alone = [classes[label] for label, files in sorted(by_class.items()) if len(files) < 2]
    if alone and len(fractions) > 1 and fractions[1] > 0:
        # Its one image must train; validation then cannot tell whether the class is learnt.
        log.warning(
            "class(es) with a single image get no validation image: %s; add images to those class folders",
            ", ".join(alone),
        )
    rng = np.random.default_rng(seed)
    parts: list[list[tuple[str, int]]] = [[] for _ in fractions]
    for label, files in sorted(by_class.items()):
        order = [files[i] for i in rng.permutation(len(files))]
        counts = [int(round(len(files) * f)) for f in fractions[1:]]
        # A class with few images keeps at least one in validation, and one in training.
        if len(fractions) > 1 and fractions[1] > 0 and len(files) >= 2:
            counts[0] = max(counts[0], 1)
        while sum(counts) > len(files) - 1 and any(counts):
            counts[counts.index(max(counts))] -= 1
        start = len(files) - sum(counts)
        parts[0] += [(f, label) for f in order[:start]]
        for i, count in enumerate(counts, start=1):
            parts[i] += [(f, label) for f in order[start : start + count]]
            start += count
    return parts


def _limit_per_class(items: list[tuple[str, int]], limit: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[tuple[str, int]]] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    kept = []
    for label in sorted(by_label):
        group = by_label[label]
        if len(group) > limit:
            group = [group[i] for i in sorted(rng.choice(len(group), limit, replace=False))]
        kept += group
    return kept


def split_folders(root: Path) -> dict[str, Path]:
    """{'train' | 'val' | 'test': folder} for the split folders directly in ``root``."""
    return {
        SPLIT_ALIASES[p.name.lower()]: p
        for p in root.iterdir()
        if p.is_dir() and p.name.lower() in SPLIT_ALIASES
    }


def discover(
    root: str | os.PathLike[str],
    split: tuple[float, float, float] = (0.8, 0.16, 0.04),
    seed: int = 42,
    max_per_class: int | None = None,
) -> DatasetIndex:
    """Find classes and images; split them when the folder has no train/val folders."""
    # Absolute paths in splits.csv keep a run folder usable from any working directory.
    root = Path(root).absolute()
    if not root.is_dir():
        raise DataError(f"{root} not found; expected a folder {root}/<class>/<image>.jpg")
    extensions = image_extensions()
    split_dirs = split_folders(root)
    skipped: list[tuple[str, str]] = []
    carved: dict[str, float] = {}
    if "train" in split_dirs:
        trees = {}
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
        splits = {
            name: [(f, label_of[c]) for c in classes for f in tree.get(c, [])] for name, tree in trees.items()
        }
        if "val" not in splits:
            # train/ + test/ only (chest X-rays): carve validation out of train, stratified.
            val_share = split[1] / (split[0] + split[1])
            by_class: dict[int, list[str]] = {}
            for f, label in splits["train"]:
                by_class.setdefault(label, []).append(f)
            carve = (1 - val_share, val_share)
            splits["train"], splits["val"] = _stratified_split(by_class, carve, seed, classes)
            carved = dict(zip(SPLITS, carve))
        layout = "split-folders"
    else:
        tree, skipped = _read_class_tree(root, extensions)
        _check_classes(root, tree)
        classes = sorted(tree)
        by_class = {i: tree[c] for i, c in enumerate(classes)}
        fractions = split if split[2] > 0 else split[:2]
        parts = _stratified_split(by_class, fractions, seed, classes)
        splits = dict(zip(SPLITS, parts))
        carved = dict(zip(SPLITS, fractions))
        layout = "class-folders"
    splits = {name: splits[name] for name in SPLITS if name in splits and splits[name]}
    if max_per_class is not None:
        splits = {name: _limit_per_class(items, max_per_class, seed) for name, items in splits.items()}
    return DatasetIndex(root=root, classes=classes, splits=splits, skipped=skipped, layout=layout, carved=carved)


def read_labelled_folder(
    root: str | os.PathLike[str], classes: list[str]
) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(path, label) pairs of ``root/<class>/*`` labelled with a trained model's ``classes``.

    The folder may hold only some of the classes; a class the model does not know is an error
    that lists it, since its images could never be predicted right.
    """
    import difflib

    root = Path(root).absolute()
    if not root.is_dir():
        raise DataError(f"{root} not found; expected a folder {root}/<class>/<image>.jpg")
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
