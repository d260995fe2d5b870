"""Manifests: images listed in a file instead of sorted into class folders.

``DATA`` may be a CSV or JSON Lines file with ``path,label[,split][,group]`` (paths relative to
the file), or a folder holding Hugging Face ``imagefolder``'s ``metadata.csv`` or
``metadata.jsonl`` (a ``file_name`` column, relative to the metadata file, and a ``label``
column), at its top or in its ``train``/``validation``/``test`` folders. A row naming a missing
file is skipped and listed, as an unreadable image in a class folder is; a row that cannot be
read is an error naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit._io import PATH_ERRORS, not_regular_reason
from transferkit.data.images import image_extensions
from transferkit.data.index import DatasetIndex
from transferkit.data.splits import SPLIT_ALIASES, carve_all, carve_validation, finish_splits, split_folders
from transferkit.errors import DataError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
"""The file names Hugging Face's ``imagefolder`` reads its rows from."""
RESERVED = {"path", "file_name", "split", "group"}


@dataclass(frozen=True)
class Row:
    """One image a manifest lists: its absolute path, class, split (None: to be carved) and group."""

    file: Path
    line: int
    path: str
    label: str
    split: str | None
    group: str


def is_manifest(path: Path) -> bool:
    """Whether ``path`` is read as a manifest: any file (a wrong kind is refused when read) or a
    folder holding an ``imagefolder`` metadata file."""
    return path.is_file() or bool(path.is_dir() and metadata_files(path))


def metadata_files(folder: Path) -> list[tuple[Path, str | None]]:
    """(metadata file, the split its folder names) at the top of ``folder`` and in its split folders."""
    places = [(folder, None)] + [(path, split) for split, path in sorted(split_folders(folder).items())]
    found = []
    for place, split in places:
        present = [place / name for name in METADATA_NAMES if (place / name).is_file()]
        if len(present) > 1:
            raise DataError(f"{place} holds both {' and '.join(p.name for p in present)}; keep one of them")
        found += [(path, split) for path in present]
    return found


def read_rows(file: Path, folder_split: str | None = None) -> list[Row]:
    """Every row of one manifest; a row that cannot be read raises one line naming it."""
    imagefolder = file.name in METADATA_NAMES
    kind = "jsonl" if imagefolder and file.suffix == ".jsonl" else FORMATS.get(file.suffix.lower())
    if kind is None:
        raise DataError(f"{file} is a file but not a manifest; DATA is an image folder, a .csv or .jsonl manifest "
                        "(path,label[,split]) or a registered dataset name")
    records = list(_csv_records(file) if kind == "csv" else _jsonl_records(file))
    columns = list(dict.fromkeys(key for _, record in records for key in record))
    path_column = "file_name" if imagefolder or ("file_name" in columns and "path" not in columns) else "path"
    label_column = _label_column(file, columns, path_column, imagefolder)
    rows = []
    for line, record in records:
        def bad(problem: str, line: int = line) -> DataError:
            return DataError(f"{file}, line {line}: {problem}")

        path = _text(record.get(path_column), bad, path_column)
        label = _text(record.get(label_column), bad, label_column)
        if not path:
            raise bad(f"no {path_column}; give each row its image's path, relative to {file.parent}")
        if not label:
            raise bad(f"no {label_column} for {path}; give every image its class, or leave the row out")
        split = _split(_text(record.get("split"), bad, "split"), path, folder_split, imagefolder, bad)
        group = _text(record.get("group"), bad, "group")
        absolute = os.path.normpath(os.path.join(file.parent, os.path.expanduser(path)))
        rows.append(Row(file, line, absolute, label, split, group))
    if not rows:
        raise DataError(f"{file} lists no images; a manifest has a header and one row per image, e.g. "
                        "path,label then cats/1.jpg,cat")
    given = [row for row in rows if row.split]
    if given and len(given) < len(rows):
        row = next(row for row in rows if not row.split)
        raise DataError(f"{row.file}, line {row.line}: no split for {row.path} while other rows have one; "
                        "give every row a split (train, val or test) or none, to have them carved")
    return rows


def _csv_records(file: Path) -> Iterator[tuple[int, dict[str, str]]]:
    # utf-8-sig: Excel's "CSV UTF-8" begins with a byte-order mark, else part of the first column's name.
    with file.open(newline="", encoding="utf-8-sig", errors=PATH_ERRORS) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        for record in reader:
            if not any(value.strip() for value in record):
                continue  # a blank line, as spreadsheets leave at the end
            if len(record) != len(header):
                raise DataError(
                    f"{file}, line {reader.line_num}: {len(record)} values where the header ({','.join(header)}) has "
                    f"{len(header)}; put a value that holds a comma in double quotes"
                )
            yield reader.line_num, dict(zip(header, record))


def _jsonl_records(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with file.open(encoding="utf-8", errors=PATH_ERRORS) as handle:
        for line, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                record = error
            if not isinstance(record, dict):
                reason = f"not JSON ({record.msg})" if isinstance(record, json.JSONDecodeError) else "not a JSON object"
                raise DataError(f'{file}, line {line}: {reason}; write one object a line, e.g. '
                                '{"path": "cats/1.jpg", "label": "cat"}')
            yield line, record


def _label_column(file: Path, columns: list[str], path_column: str, imagefolder: bool) -> str:
    if path_column not in columns:
        shown = ", ".join(columns[:8]) or "none"
        raise DataError(f"{file} has no {path_column} column (its columns: {shown}); "
                        + ("imagefolder's metadata names each image in file_name" if imagefolder
                           else "a manifest's columns are path,label[,split][,group]"))
    if "label" in columns:
        return "label"
    others = [name for name in columns if name not in RESERVED]
    if imagefolder and len(others) == 1:
        return others[0]  # imagefolder's one feature column: the class, whatever it is called
    shown = ", ".join(columns[:8])
    raise DataError(f"{file} has no label column (its columns: {shown}); name the column of class names label")


def _text(value: Any, bad: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad(f"{column} is {json.dumps(value)[:40]}; give a name or a number")
    return str(value).strip()


def _split(value: str, path: str, folder_split: str | None, imagefolder: bool, bad: Any) -> str | None:
    if value:
        if value.lower() not in SPLIT_ALIASES:
            raise bad(f"split {value!r} is not train, val or test; use one of those, or leave split empty everywhere")
        return SPLIT_ALIASES[value.lower()]
    if folder_split:
        return folder_split
    first = Path(path).parts[0].lower() if imagefolder and len(Path(path).parts) > 1 else ""
    return SPLIT_ALIASES.get(first)  # imagefolder's root metadata naming train/x.jpg: that split


def all_rows(source: Path) -> list[Row]:
    if source.is_dir():
        return [row for file, split in metadata_files(source) for row in read_rows(file, split)]
    return read_rows(source)


def usable_rows(rows: list[Row]) -> tuple[list[Row], list[tuple[str, str]]]:
    """The rows whose file is an image that exists, each path once; (path, reason) for the others."""
    extensions = image_extensions()
    kept: dict[str, Row] = {}
    skipped: dict[str, str] = {}
    for row in rows:
        where = f"{row.file.name} line {row.line}"
        first = kept.get(row.path)
        if first is not None and first.label != row.label:
            skipped[row.path] = f"listed as {first.label} ({first.file.name} line {first.line}) and as {row.label} ({where})"
        elif first is not None or row.path in skipped:
            continue  # listed again under the same class: one image, used once
        elif not os.path.lexists(row.path):
            skipped[row.path] = f"listed in {where} but not found"
        elif os.path.splitext(row.path)[1].lower() not in extensions:
            skipped[row.path] = "not an image file extension"
        elif reason := not_regular_reason(row.path):
            skipped[row.path] = reason
        else:
            kept[row.path] = row
    return [row for path, row in kept.items() if path not in skipped], sorted(skipped.items())


def read_manifest(source: Path) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """{class: paths} of every usable row of ``source`` whatever its split, and the files skipped."""
    rows, skipped = usable_rows(all_rows(source))
    tree: dict[str, list[str]] = {}
    for row in rows:
        tree.setdefault(row.label, []).append(row.path)
    return tree, skipped


def read_manifest_index(
    source: Path, split: tuple[float, float, float], seed: int, max_per_class: int | None
) -> DatasetIndex:
    """A manifest's images as a ``DatasetIndex``: its splits where its rows give them (val carved
    from train where none is), else carved as a class folder is."""
    listed = all_rows(source)
    rows, skipped = usable_rows(listed)
    _check_labels(source, listed, rows)
    train_labels = {row.label for row in rows if row.split in (None, "train")}
    classes = sorted(train_labels)
    label_of = {name: i for i, name in enumerate(classes)}
    unknown = sorted({f"{row.label} ({row.split})" for row in rows if row.label not in label_of})
    if unknown:
        raise DataError(f"{source} has labels that no train row has: {', '.join(unknown)}; every class needs "
                        "training images")
    carved: dict[str, float] = {}
    if rows[0].split is None:
        by_class: dict[int, list[str]] = {}
        for row in rows:
            by_class.setdefault(label_of[row.label], []).append(row.path)
        splits, carved = carve_all(dict(sorted(by_class.items())), split, seed, classes)
    else:
        splits = {}
        for row in rows:
            splits.setdefault(row.split, []).append((row.path, label_of[row.label]))
        if "val" not in splits:
            carved = carve_validation(splits, split, seed, classes)
    groups = {row.path: row.group for row in rows if row.group}
    root = source if source.is_dir() else source.parent
    index = DatasetIndex(root=root, classes=classes, splits=finish_splits(splits, max_per_class, seed),
                         skipped=skipped, layout="manifest", carved=carved, groups=groups)
    if groups and carved:
        index.carve_by_groups({}, seed, max_per_class)  # the user's groups hold, --split-groups none or not
    return index


def _check_labels(source: Path, listed: list[Row], rows: list[Row]) -> None:
    """As for class folders: every class has a usable image, there are two classes, and train has images."""
    labels = sorted({row.label for row in listed})
    usable = {row.label for row in rows}
    empty = [label for label in labels if label not in usable]
    if empty:
        counts = {label: sum(row.label == label for row in listed) for label in empty}
        named = ", ".join(f"{label} ({count} rows, no image found)" for label, count in counts.items())
        raise DataError(f"labels with no usable images in {source}: {named}; fix their paths or remove those rows")
    if len(labels) < 2:
        raise DataError(f"only one label ({labels[0]!r}) in {source}; a classifier needs at least two classes")
    if rows[0].split is not None and not any(row.split == "train" for row in rows):
        raise DataError(f"no row of {source} has split train; give the training images split train")
