from __future__ import annotations

import csv
import json
import logging
import os
import select
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, make_folder, make_image
from transferkit.cli import main
from transferkit.data.exclude import read_exclusions
from transferkit.data.folders import discover
from transferkit.data.images import load_image, preprocess_image, scan_images
from transferkit.data.registry import resolve_data_source
from transferkit.errors import DataError


def test_class_folders_are_split_80_16_4_stratified_and_seeded(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=50)
    index = discover(root, seed=1)
    assert index.classes == ["blue", "red"]
    assert {s: len(v) for s, v in index.splits.items()} == {"train": 80, "val": 16, "test": 4}
    for split, per_class in index.counts().items():
        assert per_class["blue"] == per_class["red"], split
    again = discover(root, seed=1)
    assert again.splits == index.splits
    other = discover(root, seed=2)
    assert other.splits["val"] != index.splits["val"]
    every = [p for items in index.splits.values() for p, _ in items]
    assert len(every) == len(set(every)) == 100


def test_custom_split_fractions(tmp_path: Path) -> None:
    index = discover(make_folder(tmp_path / "d", per_class=20), split=(0.5, 0.5, 0.0))
    assert {s: len(v) for s, v in index.splits.items()} == {"train": 20, "val": 20}


def test_split_folders_with_valid_alias(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_folder(root, per_class=6, split="train")
    make_folder(root, per_class=3, split="valid")
    make_folder(root, per_class=2, split="test")
    index = discover(root)
    assert index.layout == "split-folders"
    assert {s: len(v) for s, v in index.splits.items()} == {"train": 12, "val": 6, "test": 4}


def test_train_and_test_folders_only_get_validation_carved_from_train(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_folder(root, per_class=30, split="train")
    make_folder(root, per_class=5, split="test")
    index = discover(root)
    assert len(index.splits["test"]) == 10
    assert len(index.splits["train"]) + len(index.splits["val"]) == 60
    assert Counter(label for _, label in index.splits["val"]) == {0: 5, 1: 5}


def test_max_per_class_takes_a_stratified_subset(tmp_path: Path) -> None:
    index = discover(make_folder(tmp_path / "d", per_class=50), max_per_class=10)
    assert index.counts()["train"] == {"blue": 10, "red": 10}


def test_nested_folders_inside_a_class_count_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=10)
    make_image(root / "red" / "more" / "deep.png", COLOURS["red"], seed=5)
    (root / "red" / ".DS_Store").write_bytes(b"\0\1")
    (root / "red" / "Thumbs.db").write_bytes(b"\0\1")
    (root / "red" / "notes.txt").write_text("not an image")
    index = discover(root, split=(0.5, 0.5, 0.0))
    assert sum(index.counts()["train"].values()) + sum(index.counts()["val"].values()) == 21
    assert [Path(p).name for p, _ in index.skipped] == ["notes.txt"]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda root: root.mkdir(), "no images found in"),
        (lambda root: make_folder(root, classes=("red",)), r"only one class \('red'\)"),
        (lambda root: (make_folder(root), (root / "green").mkdir()), "with no usable images in .*: green \\(no image files\\)"),
        (lambda root: make_image(root / "a.jpg", (1, 2, 3), 0), "directly in .* but no class folders"),
        (lambda root: (make_folder(root), make_folder(root, classes=("red",), split="Red")), "differ only in case"),
    ],
    ids=["empty", "single-class", "empty-class", "no-class-folders", "case-clash"],
)
def test_unusable_folders_get_one_clear_error(tmp_path: Path, build, message: str) -> None:
    root = tmp_path / "d"
    build(root)
    with pytest.raises(DataError, match=message):
        discover(root)


def test_missing_folder_and_unknown_dataset_name() -> None:
    with pytest.raises(DataError, match="neither a folder nor a registered dataset.*Did you mean: hymenoptera"):
        resolve_data_source("hymenopter", data_mirror="/nonexistent")


def test_registered_dataset_resolves_to_the_mirror(tmp_path: Path) -> None:
    make_folder(tmp_path / "mirror" / "cifar10_subset", per_class=2)
    assert resolve_data_source("cifar10", data_mirror=tmp_path / "mirror") == tmp_path / "mirror" / "cifar10_subset"
    with pytest.raises(DataError, match="not in the mirror folders .* downloads are off"):
        resolve_data_source("tf_flowers", data_mirror=tmp_path / "mirror", download=False)


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    Image.new("L", (10, 8), 128).save(grey)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(np.full((8, 10), 65535, dtype=np.uint16)).save(sixteen)
    palette = tmp_path / "palette.png"
    transparent = Image.new("P", (10, 8), 0)
    transparent.putpalette([0, 0, 0] * 256)
    transparent.info["transparency"] = 0
    transparent.save(palette, transparency=0)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (10, 8), (255, 0, 0, 0)).save(rgba)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 8), (0, 255, 255, 0)).save(cmyk)
    for path, expected in [
        (grey, (128, 128, 128)),
        (sixteen, (255, 255, 255)),
        (palette, (255, 255, 255)),  # fully transparent: composited on white, not black
        (rgba, (255, 255, 255)),
    ]:
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (10, 8)
        assert image.getpixel((5, 4)) == expected, path.name
    red = load_image(cmyk).getpixel((5, 4))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (40, 20), (0, 0, 0)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_large_jpegs_decode_at_reduced_scale_but_never_below_the_needed_size(tmp_path: Path) -> None:
    path = make_image(tmp_path / "big.jpg", (10, 20, 30), seed=0, size=(2000, 1500))
    image = load_image(path, min_side=256)
    assert 256 <= min(image.size) < 1500


def test_scan_lists_every_unreadable_file(tmp_path: Path) -> None:
    good = make_image(tmp_path / "good.jpg", (10, 20, 30), seed=0, size=(200, 200))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:600])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    html = tmp_path / "page.jpg"
    html.write_text("<html><body>404</body></html>")
    failures = scan_images([str(p) for p in (good, truncated, empty, html)])
    assert set(failures) == {str(truncated), str(empty), str(html)}
    assert all(reason for reason in failures.values())


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(301, 199), (199, 301), (64, 64), (1000, 37)])
def test_preprocessing_equals_timms_eval_transform(interpolation: str, size: tuple[int, int]) -> None:
    """The torch-free preprocessing that ONNX inference and serving use must feed the model
    exactly what timm's own eval transform would: a wrong crop quietly costs accuracy."""
    import timm.data

    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    preprocessing = {
        "input_size": (3, 56, 56), "interpolation": interpolation, "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center",
    }
    reference = timm.data.create_transform(**preprocessing)(image).numpy()
    np.testing.assert_allclose(preprocess_image(image, preprocessing), reference, rtol=0, atol=1e-6)


def duplicated_folder(root: Path) -> Path:
    """train/ and val/ with one image in both splits, one filed under two classes, one twice in a class."""
    make_folder(root, per_class=12, split="train")
    make_folder(root, per_class=4, split="val", first_seed=500)
    leaked = root / "train" / "red" / "red_000.jpg"
    shutil.copy(leaked, root / "val" / "red" / "copy_of_train.jpg")
    shutil.copy(root / "train" / "red" / "red_001.jpg", root / "train" / "blue" / "actually_red.jpg")
    shutil.copy(root / "train" / "blue" / "blue_002.jpg", root / "train" / "blue" / "blue_002 (1).jpg")
    return root


def test_identical_images_are_listed_by_kind_and_dropped_on_request(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = duplicated_folder(tmp_path / "data")
    common = ["--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64",
              "--num-workers", "0", "--frozen-epochs", "1", "--finetune-epochs", "0", "--no-progress", "--no-report"]
    assert main(["train", str(data), "--output", str(tmp_path / "kept"), *common]) == 0
    printed = capsys.readouterr().out
    assert "3 groups of identical images (1 across splits, 1 under two classes" in printed
    with (tmp_path / "kept" / "duplicates.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["group"] for r in rows} == {"1", "2", "3"}
    assert sum(1 for _ in (tmp_path / "kept" / "splits.csv").open()) - 1 == 12 * 2 + 4 * 2 + 3, "listed, not dropped"

    assert main(["train", str(data), "--output", str(tmp_path / "dropped"), "--drop-duplicates", *common]) == 0
    with (tmp_path / "dropped" / "skipped.csv").open() as handle:
        skipped = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(handle)}
    assert skipped["copy_of_train.jpg"].startswith("duplicate of") and "train/red/red_000.jpg" in skipped["copy_of_train.jpg"]
    assert "filed under blue and red" in skipped["actually_red.jpg"] and "filed under blue and red" in skipped["red_001.jpg"]
    assert len([name for name in skipped if name.startswith("blue_002")]) == 1, "one copy of a same-class pair stays"
    used = (tmp_path / "dropped" / "splits.csv").read_text()
    assert all(name not in used for name in ("copy_of_train.jpg", "actually_red.jpg", "train/red/red_001.jpg"))


def test_class_imbalance_is_reported_with_the_fix(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=6, classes=("blue",))
    make_folder(data, per_class=20, classes=("red",), first_seed=500)
    assert main(["train", str(data), "--output", str(tmp_path / "run"), "--model", "test_efficientnet",
                 "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0", "--frozen-epochs", "1",
                 "--finetune-epochs", "0", "--no-progress", "--no-report"]) == 0
    printed = capsys.readouterr().out
    assert "class imbalance: red has 3.2x the training images of blue; --class-balance weight" in printed


def test_float_images_are_scaled_not_blackened(tmp_path: Path) -> None:
    """Float TIFFs (microscopy, remote sensing) usually hold [0, 1]; a plain convert clips them to black."""
    unit = np.full((8, 10), 0.5, np.float32)
    unit[0, :3] = [np.nan, np.inf, -np.inf]
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    Image.fromarray(np.full((8, 10), 1000.0, np.float32)).save(tmp_path / "counts.tif")
    Image.fromarray(np.full((8, 10), 3e6, np.float32)).save(tmp_path / "huge.tif")
    unit_image = load_image(tmp_path / "unit.tif")
    assert unit_image.getpixel((5, 4)) == (127, 127, 127)
    assert [unit_image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (255, 255, 255), (0, 0, 0)], "nan, +inf, -inf"
    assert load_image(tmp_path / "counts.tif").getpixel((5, 4)) == (3, 3, 3), "a 16-bit range, as a 16-bit TIFF would be"
    assert load_image(tmp_path / "huge.tif").getpixel((5, 4)) == (255, 255, 255), "beyond 16 bits: by its maximum"


def test_a_class_with_one_image_is_named_when_it_gets_no_validation_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_folder(tmp_path / "d", per_class=10, classes=("blue", "red"))
    make_folder(root, per_class=1, classes=("green",))
    with caplog.at_level(logging.WARNING, logger="transferkit.data.folders"):
        index = discover(root)
    assert "green" not in index.counts()["val"]
    assert "single image get no validation image: green;" in caplog.text
    assert "blue" not in caplog.text and "red" not in caplog.text


def run_as_unprivileged(function: Callable[[], object], timeout: float = 60) -> object:
    """``function()`` in a forked child that cannot override file permissions: as root (where a
    mode of 000 stops nothing) it becomes ``nobody`` first. Its result comes back as JSON."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            with os.fdopen(write_end, "w") as out:
                json.dump(function(), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    with os.fdopen(read_end) as answer:
        while not select.select([answer], [], [], 0.5)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the unprivileged child hung")
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return json.loads(text)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX permissions and fork")
def test_images_in_a_folder_that_cannot_be_listed_are_listed_as_skipped() -> None:
    # Below /tmp and not pytest's root-only temporary folder, so the unprivileged child reaches it.
    root = Path(tempfile.mkdtemp(prefix="transferkit-unlisted-"))
    locked = root / "red" / "locked"
    try:
        root.chmod(0o755)
        make_folder(root, per_class=6)
        make_image(locked / "hidden_from_listing.jpg", COLOURS["red"], seed=3)
        for folder in [root, *root.rglob("*")]:
            folder.chmod(0o755 if folder.is_dir() else 0o644)
        locked.chmod(0o000)
        index = run_as_unprivileged(lambda: discover(root, split=(0.5, 0.5, 0.0)).skipped)
    finally:
        if locked.exists():
            locked.chmod(0o755)
        shutil.rmtree(root)
    assert index == [[str(locked), "folder cannot be listed: permission denied; make it readable"]]


def test_exclude_reads_a_csv_that_excel_saved_with_a_byte_order_mark(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", per_class=4)
    listing = tmp_path / "drop.csv"
    # Excel's "CSV UTF-8 (Comma delimited)" begins the file with the invisible mark U+FEFF.
    listing.write_bytes("path,kind\r\nred/red_001.jpg,blurry\r\n".encode("utf-8-sig"))
    known = {str(path) for path in root.rglob("*.jpg")}
    assert read_exclusions(listing, root, known) == {str(root / "red" / "red_001.jpg"): "excluded by drop.csv (blurry)"}


def test_exclude_never_echoes_a_binary_file_s_control_characters(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", per_class=2)
    listing = tmp_path / "picked.csv"
    # Escape sequences that clear the screen and retitle the window, in what looks like a header.
    listing.write_bytes(b"\x1b[2J\x1b]0;owned\x07,\xff\xfe\x00\x01\npath\n")
    with pytest.raises(DataError) as raised:
        read_exclusions(listing, root, set())
    message = str(raised.value)
    assert not [char for char in message if not char.isprintable()], message
    assert "its columns: \\x1b[2J\\x1b]0;owned\\x07, \\xff\\xfe\\x00\\x01)" in message


def test_exclude_does_not_tell_whether_a_file_outside_the_data_folder_exists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_folder(tmp_path / "data", per_class=2)
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("exists")
    listing = tmp_path / "drop.csv"
    listing.write_text(f"path\n{secret}\n{secret.with_name('absent.txt')}\nred/gone.jpg\n")
    known = {str(path) for path in root.rglob("*.jpg")}
    with caplog.at_level(logging.INFO, logger="transferkit"):
        assert read_exclusions(listing, root, known) == {}
    messages = [record.getMessage() for record in caplog.records]
    # The existing file and the absent one are counted alike; only the path inside DATA is looked up.
    assert messages == [
        f"1 paths listed in {listing} name no file (in {root} or the working folder); they are ignored",
        f"2 paths listed in {listing} are outside the data folder {root}; they are ignored",
    ]
