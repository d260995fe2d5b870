"""DATA as a manifest: a CSV or JSON Lines file of paths and labels, or a folder holding Hugging
Face imagefolder's metadata.csv, trained on, audited and evaluated as a class folder is."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from conftest import COLOURS, make_image, tiny_config
from test_audit import tiny_audit_options

from transferkit import train
from transferkit.audit.config import AuditConfig
from transferkit.cli import main
from transferkit.commands.audit import audit
from transferkit.commands.evaluate import evaluate
from transferkit.data.folders import discover
from transferkit.errors import DataError
from transferkit.run.folder import RunFolder


def make_images(folder: Path, per_class: int = 12, classes: tuple[str, ...] = ("blue", "red")) -> list[tuple[str, str]]:
    """(path relative to ``folder``, class) of real JPEGs in one flat folder: their names say nothing."""
    listed = []
    for k, name in enumerate(classes):
        for i in range(per_class):
            relative = f"images/{k * 100 + i:04d}.jpg"
            make_image(folder / relative, COLOURS[name], seed=k * 1000 + i)
            listed.append((relative, name))
    return listed


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_csv_manifest_trains_from_the_cli_its_missing_file_skipped_and_its_groups_kept_whole(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "project"
    listed = make_images(data)
    # Two shots per group, as two photos of one specimen: a carved split must not part them.
    rows = [[path, label, f"specimen{i // 2}"] for i, (path, label) in enumerate(listed)]
    rows.insert(5, ["images/lost.jpg", "blue", "specimen99"])
    manifest = write_csv(data / "labels.csv", ["path", "label", "group"], rows)
    run = tmp_path / "run"

    code = main(["train", str(manifest), "--output", str(run), "--model", "test_efficientnet", "--weights",
                 str(tiny_weights), "--image-size", "64", "--num-workers", "0", "--frozen-epochs", "3",
                 "--finetune-epochs", "1", "--finetune-unfreeze", "2", "--no-report", "--no-audit", "--no-progress"])

    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "classes.json").read_text()) == ["blue", "red"]
    splits = read_rows(run / "splits.csv")
    expected = {str(data / path): label for path, label in listed}
    assert {row["path"]: row["class"] for row in splits} == expected
    sides: dict[str, set[str]] = {}
    for row in splits:
        sides.setdefault(row["group"], set()).add(row["split"])
    assert len(sides) == len(listed) // 2 and all(len(split) == 1 for split in sides.values())
    assert {row["split"] for row in splits} >= {"train", "val"}
    skipped = read_rows(run / "skipped.csv")
    assert skipped == [{"path": str(data / "images" / "lost.jpg"), "reason": "listed in labels.csv line 7 but not found"}]
    assert RunFolder(run).read_metrics() is not None

    evaluation = evaluate(run, manifest)  # the manifest is a labelled set for evaluate too
    assert evaluation.metrics["images"] == len(listed)
    assert evaluation.skipped == [(str(data / "images" / "lost.jpg"), "listed in labels.csv line 7 but not found")]


def test_a_json_lines_manifest_keeps_its_split_column(tmp_path: Path, tiny_weights: Path) -> None:
    data = tmp_path / "project"
    listed = make_images(data, per_class=10)
    names = ["train"] * 6 + ["validation"] * 3 + ["test"]  # validation: an alias of val, as folders take it
    split_of = {}
    with (data / "labels.jsonl").open("w") as handle:
        for i, (path, label) in enumerate(listed):
            handle.write(json.dumps({"path": path, "label": label, "split": names[i % 10]}) + "\n")
            split_of[str(data / path)] = names[i % 10].replace("validation", "val")

    result = train(data / "labels.jsonl", tiny_config(tmp_path / "run", tiny_weights, **{"frozen.epochs": 2}))

    splits = read_rows(tmp_path / "run" / "splits.csv")
    assert {row["path"]: row["split"] for row in splits} == split_of
    assert result.counts == {"train": {"blue": 6, "red": 6}, "val": {"blue": 3, "red": 3}, "test": {"blue": 1, "red": 1}}


def test_an_imagefolder_metadata_csv_is_audited_as_a_class_folder_is(tmp_path: Path, tiny_weights: Path) -> None:
    data = tmp_path / "hub_copy"
    listed = make_images(data, per_class=10)
    # Hugging Face's convention: file_name relative to the metadata file, the class in a feature column.
    write_csv(data / "metadata.csv", ["file_name", "species"], [[path, label] for path, label in listed])
    index = discover(data)
    assert index.layout == "manifest" and index.classes == ["blue", "red"]

    result = audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights)))

    scores = read_rows(result.output / "scores.csv")
    assert sorted(row["path"] for row in scores) == sorted(str(data / path) for path, _ in listed)
    assert result.json_file.is_file() and result.html_file.is_file()


def test_imagefolder_split_folders_give_the_splits(tmp_path: Path) -> None:
    data = tmp_path / "hub_copy"
    for split, count in (("train", 8), ("test", 3)):
        listed = make_images(data / split, per_class=count)
        with (data / split / "metadata.jsonl").open("w") as handle:
            handle.writelines(json.dumps({"file_name": path, "label": label}) + "\n" for path, label in listed)

    index = discover(data, seed=0)

    counts = index.counts()
    assert counts["test"] == {"blue": 3, "red": 3}
    assert {name: counts["train"][name] + counts["val"][name] for name in ("blue", "red")} == {"blue": 8, "red": 8}
    assert index.carved and "test" not in index.carved, "val is cut from train; the given test split stands"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("labels.csv", "path,label\nimages/0000.jpg,blue\nimages/0001.jpg,blue,extra\n",
         r"labels\.csv, line 3: 3 values where the header \(path,label\) has 2; put a value that holds a comma in double quotes$"),
        ("labels.csv", "path,label\nimages/0000.jpg,blue\nimages/0001.jpg,\n",
         r"labels\.csv, line 3: no label for images/0001\.jpg; give every image its class, or leave the row out$"),
        ("labels.csv", "path,label,split\nimages/0000.jpg,blue,train\nimages/0001.jpg,red,holdout\n",
         r"labels\.csv, line 3: split 'holdout' is not train, val or test"),
        ("labels.jsonl", '{"path": "images/0000.jpg", "label": "blue"}\n{"path": "images/0001.jpg" "label": "red"}\n',
         r"labels\.jsonl, line 2: not JSON \(Expecting ',' delimiter\); write one object a line"),
        ("labels.csv", "file,class\nimages/0000.jpg,blue\n",
         r"labels\.csv has no path column \(its columns: file, class\); a manifest's columns are path,label"),
    ],
)
def test_a_malformed_row_is_one_line_naming_the_file_the_line_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    make_images(tmp_path, per_class=2)
    (tmp_path / name).write_text(text)

    assert main(["train", str(tmp_path / name), "--output", str(tmp_path / "run"), "--no-progress"]) == 2

    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {tmp_path / name}")
    assert re.search(message, lines[0]), lines[0]


def test_a_row_naming_an_image_twice_under_two_classes_is_skipped_not_trusted(tmp_path: Path) -> None:
    listed = make_images(tmp_path, per_class=4)
    rows = [[path, label] for path, label in listed] + [[listed[0][0], "red"], [listed[1][0], "blue"]]
    index = discover(write_csv(tmp_path / "labels.csv", ["path", "label"], rows))

    assert dict(index.skipped) == {str(tmp_path / listed[0][0]): "listed as blue (labels.csv line 2) and as red (labels.csv line 10)"}
    assert sum(len(items) for items in index.splits.values()) == len(listed) - 1


def test_a_manifest_whose_rows_of_a_class_all_name_missing_files_is_refused(tmp_path: Path) -> None:
    listed = make_images(tmp_path, per_class=3, classes=("blue",))
    rows = [[path, label] for path, label in listed] + [["images/gone1.jpg", "red"], ["images/gone2.jpg", "red"]]

    with pytest.raises(DataError, match=r"labels with no usable images in .*labels\.csv: red \(2 rows, no image found\)"):
        discover(write_csv(tmp_path / "labels.csv", ["path", "label"], rows))


def test_a_group_column_keeps_each_group_on_one_side_even_where_near_copies_are_not_grouped(tmp_path: Path) -> None:
    listed = make_images(tmp_path, per_class=12)
    # Four shots per group: a random cut of 24 images into 0.5 / 0.5 parts all but surely parts some.
    rows = [[path, label, f"patient{i // 4}"] for i, (path, label) in enumerate(listed)]
    manifest = write_csv(tmp_path / "labels.csv", ["path", "label", "group"], rows)

    index = discover(manifest, split=(0.5, 0.5, 0.0), seed=0)

    side = {path: name for name, items in index.splits.items() for path, _ in items}
    for first in range(0, len(listed), 4):
        assert len({side[str(tmp_path / path)] for path, _ in listed[first:first + 4]}) == 1
    assert index.groups[str(tmp_path / listed[0][0])] == "patient0"
    assert set(index.counts()) == {"train", "val"}
