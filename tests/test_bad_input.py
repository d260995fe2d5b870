"""One corpus of messy files, made here, through every command that reads images: each file is
used (converted to RGB) or skipped with the same reason everywhere, and nothing crashes."""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import COLOURS, make_folder, make_image, serving
from transferkit._io import read_csv_rows
from transferkit.cli import main
from transferkit.commands.serve_app import ServeLimits, create_app

LATIN1_NAME = os.fsdecode(b"caf\xe9 latin-1.jpg")  # not valid UTF-8: Python carries it as a surrogate

# file name -> what every command does with it: "used", "ignored" (hidden, never listed), or the
# reason it is skipped with.
EXPECTED = {
    "truncated.jpg": "truncated or corrupt image data",
    "empty.jpg": "empty file (0 bytes)",
    "page.jpg": "not an image in any format Pillow reads",
    "bomb.png": "over the 64,000,000-pixel limit",
    "a_link.jpg": "symbolic link loop",
    "b_link.jpg": "symbolic link loop",
    "dangling.jpg": "file not found (a broken symbolic link",
    "loop": "symbolic link to a folder, not followed",
    "notes.txt": "not an image file extension",
    "pipe.jpg": "not a regular file (a FIFO)",
    "zero.jpg": "not a regular file (a character device)",
    "animated.gif": "used",
    "sixteen.png": "used",
    "float.tif": "used",
    "palette.png": "used",
    "cmyk.jpg": "used",
    "rotated.jpg": "used",
    "one_pixel.png": "used",
    "png_named.jpg": "used",
    LATIN1_NAME: "used",
    "café 🌸 日本.jpg": "used",
    "inside.png": "used",
    ".DS_Store": "ignored",
    "Thumbs.db": "ignored",
    ".hidden.jpg": "ignored",
}
USED = {name for name, fate in EXPECTED.items() if fate == "used"}
SKIPPED = {name: fate for name, fate in EXPECTED.items() if fate not in ("used", "ignored")}


def add_messy_files(folder: Path) -> None:
    """Every kind of file the issue lists, red-ish where it is an image, into one class folder."""
    folder = folder.absolute()
    good = make_image(folder / "red_big.jpg", COLOURS["red"], seed=90, size=(200, 160))
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:400])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_text("<html><body>404 Not Found</body></html>")
    # 20,000 x 20,000 pixels in a 50 kB file: decoding it would take 1.2 GB.
    Image.new("1", (20_000, 20_000)).save(folder / "bomb.png")
    (folder / "a_link.jpg").symlink_to(folder / "b_link.jpg")
    (folder / "b_link.jpg").symlink_to(folder / "a_link.jpg")
    (folder / "dangling.jpg").symlink_to(folder / "moved_away.jpg")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "notes.txt").write_text("not an image")
    os.mkfifo(folder / "pipe.jpg")  # no writer: a reader that opens it waits forever
    (folder / "zero.jpg").symlink_to("/dev/zero")  # endless zero bytes, and a size of 0

    frames = [Image.new("RGB", (30, 30), COLOURS["red"]), Image.new("RGB", (30, 30), COLOURS["blue"])]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(np.full((20, 30), 50_000, dtype=np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(np.full((20, 30), 0.8, dtype=np.float32)).save(folder / "float.tif")
    palette = Image.new("P", (30, 20), 1)
    palette.putpalette([0, 0, 0, *COLOURS["red"]] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)
    Image.new("CMYK", (30, 20), (0, 200, 200, 30)).save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.new("RGB", (40, 20), COLOURS["red"]).save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), COLOURS["red"]).save(folder / "one_pixel.png")
    Image.new("RGB", (30, 20), COLOURS["red"]).save(folder / "png_named.jpg", format="PNG")
    make_image(folder / LATIN1_NAME, COLOURS["red"], seed=91)
    make_image(folder / "café 🌸 日本.jpg", COLOURS["red"], seed=92)
    make_image(folder / "nested" / "deeper" / "inside.png", COLOURS["red"], seed=93)

    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    make_image(folder / ".hidden.jpg", COLOURS["red"], seed=94)


def fates(skipped: list[tuple[str, str]] | list[dict[str, str]]) -> dict[str, str]:
    pairs = [(row["path"], row["reason"]) if isinstance(row, dict) else row for row in skipped]
    return {os.path.basename(path): reason for path, reason in pairs}


def assert_expected_fates(used: list[str], skipped: list[tuple[str, str]] | list[dict[str, str]]) -> None:
    names = {os.path.basename(path) for path in used}
    assert USED <= names, f"not used: {USED - names}"
    listed = fates(skipped)
    assert set(listed) == set(SKIPPED), f"skipped {sorted(listed)}"
    for name, reason in SKIPPED.items():
        assert listed[name].startswith(reason), (name, listed[name])
    ignored = {name for name, fate in EXPECTED.items() if fate == "ignored"}
    assert not ignored & (names | set(listed))


@pytest.fixture(scope="module", autouse=True)
def hang_watchdog() -> Iterator[None]:
    """A command that opens the corpus's FIFO blocks forever: dump every thread's stack and end
    the session with a failure rather than hang CI."""
    faulthandler.dump_traceback_later(900, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_folder(tmp_path_factory.mktemp("messy") / "data", per_class=12)
    add_messy_files(data / "red")
    return data


@pytest.fixture(scope="module")
def messy_run(messy: Path, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("messy-run") / "run"
    code = main([
        "train", str(messy), "--output", str(run_dir), "--model", "test_efficientnet", "--weights", str(tiny_weights),
        "--image-size", "64", "--num-workers", "2", "--frozen-epochs", "2", "--finetune-epochs", "1",
        "--split", "0.6,0.4,0", "--no-progress",
    ])
    assert code == 0
    return run_dir


def test_train_uses_every_convertible_file_and_lists_the_rest_with_reasons(messy_run: Path) -> None:
    used = [row["path"] for row in read_csv_rows(messy_run / "splits.csv")]
    assert_expected_fates(used, read_csv_rows(messy_run / "skipped.csv"))
    assert len(used) == 12 * 2 + 1 + len(USED), "every good file, the big red one and each convertible one"
    # The odd bytes of the latin-1 name survive the CSV: the listed path opens the file.
    latin1 = next(path for path in used if path.endswith(LATIN1_NAME))
    assert os.fsencode(latin1).endswith(b"caf\xe9 latin-1.jpg") and Path(latin1).is_file()
    assert "No files were skipped" not in (messy_run / "report.html").read_text(errors="replace")


def test_evaluate_and_predict_treat_each_file_as_train_did(
    messy_run: Path, messy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(messy_run), str(messy), "--output", str(tmp_path / "evaluation")]) == 0
    printed = capsys.readouterr()
    rows = read_csv_rows(tmp_path / "evaluation" / "predictions.csv")
    stderr = [line.removeprefix("skipped ").split(": ", 1) for line in printed.err.splitlines() if line.startswith("skipped ")]
    assert_expected_fates([row["path"] for row in rows], stderr)
    assert json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["skipped"] == len(SKIPPED)

    assert main(["predict", str(messy_run), str(messy / "red"), "--format", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert_expected_fates([p["path"] for p in answer["predictions"]], answer["skipped"])
    assert {p["top_k"][0]["label"] for p in answer["predictions"]} <= {"blue", "red"}


def test_audit_treats_each_file_as_train_did(
    messy: Path, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "audit", str(messy), "--output", str(tmp_path / "audit"), "--model", "test_efficientnet", "--weights",
        str(tiny_weights), "--image-size", "64", "--num-workers", "2", "--split", "0.6,0.4,0", "--no-progress",
    ])
    assert code == 0
    printed = capsys.readouterr()
    stderr = [line.removeprefix("skipped ").split(": ", 1) for line in printed.err.splitlines() if line.startswith("skipped ")]
    used = [row["path"] for row in read_csv_rows(tmp_path / "audit" / "scores.csv")]
    assert_expected_fates(used, stderr)
    assert len(used) == 12 * 2 + 1 + len(USED)
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["skipped"] == len(SKIPPED)
    assert (tmp_path / "audit" / "audit.html").stat().st_size > 0


def test_predict_prints_an_undecodable_file_name_as_the_bytes_on_disk(
    messy_run: Path, messy: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["predict", str(messy_run), str(messy / "red" / LATIN1_NAME), "--format", "csv"]) == 0
    lines = capsysbinary.readouterr().out.splitlines()
    assert lines[1].startswith(os.fsencode(messy / "red" / LATIN1_NAME) + b",")


def test_compare_lists_the_skipped_files_once(
    messy: Path, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "compare", str(messy), "--strategies", "frozen,fine-tune", "--epochs", "1", "--output", str(tmp_path / "cmp"),
        "--models", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0",
        "--no-progress",
    ])
    assert code == 0
    assert f"skipped {len(SKIPPED)} unreadable, non-image or duplicate files" in capsys.readouterr().out
    for run in ("frozen", "fine-tune"):
        run_dir = tmp_path / "cmp" / run
        used = [row["path"] for row in read_csv_rows(run_dir / "splits.csv")]
        assert_expected_fates(used, read_csv_rows(run_dir / "skipped.csv"))


def test_serve_answers_each_upload_with_the_reason_the_folder_commands_give(messy_run: Path, messy: Path) -> None:
    limits = ServeLimits(max_file_bytes=200_000)
    folder = messy / "red"
    # A form upload is bytes: links and folders do not arise, hidden files are not hidden, and
    # the content, not the extension, decides (notes.txt is judged as an image and is not one).
    uploads = {name: fate for name, fate in EXPECTED.items()
               if fate != "ignored" and not (folder / name).is_symlink() and (folder / name).is_file()}
    uploads["notes.txt"] = "not an image in any format Pillow reads"
    uploads["bomb.png"] = f"over the {limits.max_pixels:,}-pixel limit; send a smaller image"
    with serving(create_app(messy_run, limits)) as url:
        for name, fate in uploads.items():
            # requests cannot put a non-UTF-8 name in a form; the bytes are what is judged.
            upload_name = "latin1.jpg" if name == LATIN1_NAME else name
            data = (folder / name).read_bytes()
            response = requests.post(f"{url}/predict", files=[("file", (upload_name, data))], timeout=30)
            if fate == "used":
                assert response.status_code == 200, (name, response.text)
                assert response.json()["predictions"][0]["top_k"][0]["label"] in ("blue", "red")
            else:
                assert response.status_code == (413 if name == "bomb.png" else 415), name
                assert response.json()["detail"].startswith(f"{upload_name}: {fate}"), response.json()["detail"]
        assert requests.get(f"{url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("command", ["train", "compare", "evaluate", "audit"])
def test_class_folders_differing_only_in_case_are_one_clear_error(
    command: str, messy_run: Path, tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=3)
    make_image(data / "Red" / "x.jpg", COLOURS["red"], seed=1)
    arguments = {
        "train": ["train", str(data), "--output", str(tmp_path / "run"), "--weights", str(tiny_weights),
                  "--model", "test_efficientnet"],
        "compare": ["compare", str(data), "--output", str(tmp_path / "run"), "--weights", str(tiny_weights),
                    "--models", "test_efficientnet"],
        "evaluate": ["evaluate", str(messy_run), str(data)],
        "audit": ["audit", str(data), "--output", str(tmp_path / "run"), "--weights", str(tiny_weights),
                  "--model", "test_efficientnet"],
    }[command]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "differ only in case (Red vs red)" in error
    assert not (tmp_path / "run" / "config.yaml").exists()


FIFO_SCRIPT = """
import json, sys
from pathlib import Path
from transferkit.data.folders import discover
from transferkit.data.images import UnreadableImage, load_image, read_image
from transferkit.commands.predict import collect_images

root = Path(sys.argv[1])
pipe, zero = root / "red" / "pipe.jpg", root / "red" / "zero.jpg"
found = {"discover": discover(root, split=(0.5, 0.5, 0.0)).skipped,
         "predict": collect_images([root / "red", pipe, zero])[1], "load_image": [], "read_image": []}
for path in (pipe, zero):
    for name, read in (("load_image", load_image), ("read_image", read_image)):
        try:
            read(path)
        except UnreadableImage as error:
            found[name].append([str(path), str(error)])
print(json.dumps(found))
"""


def test_fifos_and_devices_are_skipped_before_anything_opens_them(tmp_path: Path) -> None:
    """Each reader on its own, in a child process with a time limit, so a hang is a failure."""
    root = make_folder(tmp_path / "data", per_class=2)
    pipe, zero = root / "red" / "pipe.jpg", root / "red" / "zero.jpg"
    os.mkfifo(pipe)
    zero.symlink_to("/dev/zero")
    done = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    expected = [[str(pipe), "not a regular file (a FIFO)"], [str(zero), "not a regular file (a character device)"]]
    assert found["discover"] == expected
    assert found["predict"] == expected * 2, "in a folder and named on the command line"
    assert found["load_image"] == found["read_image"] == expected
