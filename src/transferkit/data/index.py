"""The ``DatasetIndex``: the images a run uses, their classes and splits, the files skipped and
why, byte-identical duplicates, and the CSV files a run folder keeps them in."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from transferkit._io import content_digests, read_csv_rows, write_csv
from transferkit.data.splits import SPLITS, limit_per_class
from transferkit.errors import DataError


@dataclass
class DatasetIndex:
    """What was found in an image folder or a manifest, split into train / val / test."""

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
    """Each image's group (images of one group share a split), where groups were made or a
    manifest's group column gave them."""

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
                fix = "images of them to the manifest" if self.layout == "manifest" else "images to those class folders"
                raise DataError(
                    f"after skipping {len(reasons)} unreadable, duplicate or excluded files, the {split} split has no "
                    f"images of {', '.join(missing)}; add readable {fix}"
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
        then keep at most ``max_per_class`` images per class in each, as ``discover`` did. A
        manifest's group column, where it has one, stands in for ``groups``, as ``--group-by``'s
        matches stand in for near-copies: the user's groups are the real ones."""
        from transferkit.data.groups import given_groups, grouped_split

        names = [name for name in SPLITS if name in self.carved]
        pool = [item for name in names for item in self.splits.get(name, [])]
        if self.groups:
            groups = given_groups([path for path, _ in pool], self.groups, self.duplicates)
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
            self.splits = {name: limit_per_class(items, max_per_class, seed) for name, items in self.splits.items()}
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
        # A manifest's run names the file as its data: its paths are relative to the file's folder.
        return cls(root=root.parent if root.is_file() else root, classes=classes, splits=splits, groups=groups)


