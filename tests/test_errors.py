"""The errors of a new user's first hour: each is one line on stderr that names the fix."""

from __future__ import annotations

import shutil
import socket
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import COLOURS, make_folder, make_image
from transferkit.cli import main

TINY = ["--model", "test_efficientnet", "--image-size", "64", "--num-workers", "0", "--no-progress",
        "--no-report", "--no-audit"]


def one_line_error(capsys: pytest.CaptureFixture[str], arguments: list[str], status: int = 2) -> str:
    """The command's only line on stderr, once it exited with ``status``."""
    try:
        code = main(arguments)
    except SystemExit as exit_info:  # argparse's errors exit
        code = exit_info.code
    error = capsys.readouterr().err
    assert code == status, (arguments, error)
    assert error.count("\n") == 1 and error.startswith("error: ") and "Traceback" not in error, error
    return error.strip()


def unfinished_copy(trained_run: Path, folder: Path) -> Path:
    """A run folder as a train leaves it before its model is saved."""
    shutil.copytree(trained_run, folder)
    shutil.rmtree(folder / "model")
    (folder / "metrics.json").unlink()
    return folder


def test_a_run_still_training_says_to_wait_and_a_stopped_one_how_to_resume(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = unfinished_copy(trained_run, tmp_path / "run")
    image = str(trained_run.parent / "data" / "blue" / "blue_000.jpg")
    commands = [["predict", str(run_dir), image], ["predict", str(run_dir / "model"), image],
                ["evaluate", str(run_dir)], ["export", str(run_dir)], ["serve", str(run_dir)],
                ["summary", str(run_dir)]]
    # Another process holds the folder as a train does, with the run folder's own claim.
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from transferkit.run.lock import claim
            with claim(Path({str(run_dir)!r})):
                print("claimed", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "claimed\n"
        for command in commands:
            error = one_line_error(capsys, command)
            assert error == (f"error: {run_dir} is still training (pid {holder.pid}): its model is written when "
                             "the run finishes; wait for it, or use another run"), command
    finally:
        holder.communicate("", timeout=30)
    for command in commands:
        error = one_line_error(capsys, command)
        assert error == (f"error: {run_dir} has no model: its train stopped before finishing; "
                         f"finish it with: transferkit train --resume {run_dir}"), command


@pytest.mark.parametrize(("output", "reason"), [
    ("/proc/x.onnx", "--output /proc/x.onnx cannot be written (No such file or directory)"),
    ("some.jpg/model.onnx", "--output some.jpg/model.onnx: some.jpg is a file, not a folder"),
])
def test_export_to_an_output_that_cannot_be_written_names_it_and_the_fix(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    output: str, reason: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    error = one_line_error(capsys, ["export", str(trained_run), "--output", output, "--no-progress"])
    assert error == f"error: {reason}; choose an --output in a writable folder"
    assert (tmp_path / "some.jpg").read_bytes() == b"\xff\xd8\xff\xe0"


def test_serve_on_a_taken_port_says_so_and_names_the_option(trained_run: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.run(
            [sys.executable, "-m", "transferkit.cli", "serve", str(trained_run), "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )
    assert process.returncode == 2 and process.stdout == "", "nothing is served, so no address is printed"
    assert process.stderr.count("\n") == 1 and process.stderr.startswith(
        f"error: port {port} on 127.0.0.1 is taken by another program; choose another with --port"), process.stderr


def test_evaluate_on_folders_of_other_classes_names_the_mismatch_without_a_guess(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other_classes"
    make_image(other / "ants" / "a.jpg", COLOURS["red"], seed=1)
    make_image(other / "bees" / "b.jpg", COLOURS["blue"], seed=2)
    error = one_line_error(capsys, ["evaluate", str(trained_run), str(other), "--no-progress"])
    assert error == (f"error: none of the class folders in {other} (ants, bees) is a class the model knows "
                     "(blue, green, red); evaluate a folder of those classes, or a run trained on these")


def test_train_names_every_class_folder_without_a_usable_image(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "nonimg", per_class=3, classes=("blue",))
    (data / "notes").mkdir()
    (data / "notes" / "readme.txt").write_text("not an image")
    for i in range(3):
        (data / "broken" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (data / "broken" / f"{i}.jpg").write_bytes(b"not a jpeg")
    error = one_line_error(capsys, ["train", str(data), "--output", str(tmp_path / "run"), "--weights",
                                    str(tiny_weights), *TINY])
    assert error == (f"error: class folders with no usable images in {data}: broken (3 image files, none readable), "
                     "notes (no image files); add images or remove those folders")


def test_a_misspelt_command_gets_the_closest_one(capsys: pytest.CaptureFixture[str]) -> None:
    error = one_line_error(capsys, ["trian", "photos/"])
    assert error == "error: transferkit: argument command: invalid choice: 'trian' (did you mean train?); see transferkit --help"


def test_epochs_sets_both_phases_and_a_phase_option_overrides_it(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    data = make_folder(tmp_path / "data", per_class=10)
    run_dir = tmp_path / "run"
    code = main(["train", str(data), "--output", str(run_dir), "--weights", str(tiny_weights), *TINY,
                 "--epochs", "2", "--frozen-patience", "5", "--finetune-epochs", "1"])
    assert code == 0, capsys.readouterr().err
    epoch_lines = [line.split()[:2] for line in capsys.readouterr().out.splitlines() if line.startswith(("frozen ", "finetune "))]
    assert epoch_lines == [["frozen", "1/2"], ["frozen", "2/2"], ["finetune", "1/1"]]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["frozen"]["epochs"], config["finetune"]["epochs"]) == (2, 1), "a resumed run reads each phase's own"
    assert "epochs" not in config

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--epochs EPOCHS       most epochs of both phases" in capsys.readouterr().out
    error = one_line_error(capsys, ["train", str(data), "--output", str(tmp_path / "bad"), "--epochs", "-1"])
    assert error == "error: --epochs must be a count of 0 or more, got -1"


def test_a_fifo_planted_as_the_lock_of_an_unfinished_run_never_makes_predict_wait(
    trained_run: Path, tmp_path: Path
) -> None:
    run_dir = unfinished_copy(trained_run, tmp_path / "run")
    lock = run_dir / ".transferkit.lock"
    lock.unlink(missing_ok=True)
    os.mkfifo(lock)
    image = str(trained_run.parent / "data" / "blue" / "blue_000.jpg")
    # A reader that opened the FIFO to see who holds the run would wait for a writer forever.
    process = subprocess.run([sys.executable, "-m", "transferkit.cli", "predict", str(run_dir), image],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2, process.stderr
    assert process.stderr.strip().endswith(f"finish it with: transferkit train --resume {run_dir}"), process.stderr
