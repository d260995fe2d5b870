from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_folder
from transferkit.cli import main


def test_help_lists_every_command_and_the_train_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    for command in ("train", "compare", "evaluate", "predict", "report", "export", "serve", "summary"):
        assert f"    {command}" in listed, command
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--weights", "--split", "--frozen-epochs", "--finetune-unfreeze", "--resume",
                 "--class-balance", "--batchnorm", "--precision", "--devices", "--max-per-class", "--splits-from",
                 "--cache-dir"):
        assert flag in text, flag
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for flag in ("--strategies", "--models", "--epochs", "--max-per-class", "--weights", "--hidden-size", "--seed"):
        assert flag in text, flag
    assert "--model " not in text and "--batchnorm" not in text, "each strategy sets these itself"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--split", "0.5,0.6,0.1"], "--split fractions must sum to 1"),
        (["--frozen-optimizer", "lion"], "--frozen-optimizer must be one of adamw, adam, sgd, rmsprop"),
        (["--finetune-unfreeze", "many"], "--finetune-unfreeze must be a block count"),
        (["--model", "efficientnet_lite9"], "unknown model 'efficientnet_lite9'.*Did you mean"),
        (["--splits-from", "no-such-run"], "no-such-run has no splits.csv, classes.json, skipped.csv"),
        (["--strategy", "frozen"], "--strategy 'frozen' is not one Lightning knows \\(auto, ddp, "),
        (["--precision", "bf15-mixed"], "--precision 'bf15-mixed' is not one Lightning knows .* Did you mean: bf16-mixed"),
    ],
)
def test_config_errors_are_one_line_each_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    data = make_folder(tmp_path / "data", per_class=3)
    code = main(["train", str(data), "--output", str(tmp_path / "run"), *arguments])
    error = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in error
    assert re.search(message, error), error
    assert all(line.startswith("error: ") for line in error.strip().splitlines())
    assert not (tmp_path / "run" / "config.yaml").exists(), "nothing to resume: the same command can run again"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["train", "DATA", "--frozen-epoch", "3"], "--frozen-epoch (did you mean --frozen-epochs?), 3"),
        (["train", "DATA", "--no-progres"], "--no-progres (did you mean --no-progress?)"),
        # The frozen phase trains the head alone: it has no blocks to unfreeze.
        (["train", "DATA", "--frozen-unfreeze", "2"], "--frozen-unfreeze (did you mean --finetune-unfreeze?), 2"),
        (["predict", "RUN", "x.jpg", "--top", "3"], "--top (did you mean --top-k?)"),
        (["compare", "DATA", "--strategis", "frozen"], "--strategis (did you mean --strategies?)"),
        (["evaluate", "RUN", "DATA", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_unknown_options_are_one_line_with_the_closest_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    # A prefix of a real option is not taken as that option: a typo is reported, never guessed.
    arguments = [str(tmp_path / a) if a in ("DATA", "RUN") else a for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.count("\n") == 1 and error.startswith(f"error: transferkit {arguments[0]}: ")
    assert message in error and error.rstrip().endswith(f"see transferkit {arguments[0]} --help")
    assert not (tmp_path / "DATA").exists()


def test_run_folders_from_an_incompatible_version_are_one_clear_error(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    newer = tmp_path / "newer"
    shutil.copytree(trained_run, newer)
    config = newer / "config.yaml"
    config.write_text(config.read_text().replace("format_version: 1", "format_version: 2"))
    assert main(["train", "--resume", str(newer)]) == 2
    assert "has format version 2, this transferkit reads 1" in capsys.readouterr().err

    model_config = newer / "model" / "config.json"
    written = json.loads(model_config.read_text())
    for damage, message in [
        ({k: v for k, v in written.items() if k != "architecture"}, "config.json has no architecture: not a transferkit or timm model folder"),
        (
            {**written, "num_classes": 7, "label_names": [*written["label_names"], "a", "b", "c", "d"]},
            "model.safetensors does not fit the model config.json describes \\(.*size mismatch for classifier.weight",
        ),
        # One name short: every prediction would carry its neighbour's name.
        ({**written, "label_names": written["label_names"][:-1]}, "config.json names 2 labels for 3 classes"),
        ({**written, "label_names": [written["label_names"][0]] * 3}, "config.json names 3 labels for 3 classes \\(label_names must list each class once"),
        ({**written, "transferkit": {**written["transferkit"], "format_version": 9}}, "was written by a newer transferkit \\(format 9\\); upgrade transferkit"),
    ]:
        model_config.write_text(json.dumps(damage))
        for command in (["evaluate", str(newer), "--split", "val"], ["predict", str(newer), str(trained_run / "splits.csv")]):
            assert main(command) == 2
            error = capsys.readouterr().err
            assert error.count("\n") == 1 and re.search(message, error), (command, error)


def test_non_finite_and_out_of_range_numbers_are_all_refused_at_once_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=3)
    # Each of these passed the checks before (NaN compares false with every bound) and either
    # trained on two images or failed with a traceback after the data scan.
    code = main([
        "train", str(data), "--output", str(tmp_path / "run"), "--split", "nan,0.5,0.5", "--frozen-lr", "nan",
        "--frozen-warmup-epochs", "inf", "--finetune-lr", "1e38", "--seed", "-1", "--devices", "0",
        "--finetune-weight-decay=-inf", "--label-smoothing", "nan", "--accelerator", "gpu",
    ])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert errors == [
        "error: --label-smoothing must be a finite number, got nan",
        "error: --split needs three finite fractions, got nan,0.5,0.5; e.g. --split 0.8,0.16,0.04",
        "error: --frozen-lr must be a finite number, got nan",
        "error: --frozen-warmup-epochs must be a finite number, got inf",
        "error: --finetune-weight-decay must be a finite number, got -inf",
        "error: --finetune-lr must be above 0 and at most 1e+30, got 1e+38",
        "error: --seed must be between 0 and 4294967295, got -1",
        "error: --devices must be auto, a count of 1 or more (-1 for all) or a list like 0,1, got '0'",
    ]
    assert not (tmp_path / "run").exists(), "checked before the data scan"

    # Valid names, impossible here, with or without a GPU: Lightning's own judgement, still
    # before the data scan, as one line naming the option and what is missing.
    for options, reason in [
        (["--accelerator", "tpu"], "torch_xla"),
        (["--precision", "transformer-engine"], "transformer_engine"),
        (["--accelerator", "cpu", "--strategy", "fsdp"], "requires a GPU accelerator"),
        (["--accelerator", "cpu", "--devices", "-1"], "should be an int > 0"),
    ]:
        code = main(["train", str(data), "--output", str(tmp_path / "run"), *options])
        errors = capsys.readouterr().err.strip().splitlines()
        named = [" ".join(options[i:i + 2]) for i in range(0, len(options), 2)]
        assert code == 2 and len(errors) == 1 and reason in errors[0], errors
        assert all(option in errors[0] for option in named), errors
    assert not (tmp_path / "run").exists()


def test_unusable_files_and_folders_are_one_line_errors(
    trained_run: Path, tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    import torch

    data = make_folder(tmp_path / "data", per_class=3)
    tiny = ["--model", "test_efficientnet", "--image-size", "64", "--num-workers", "0", "--no-progress"]

    def one_line_error(arguments: list[str]) -> str:
        code = main(arguments)
        error = capsys.readouterr().err
        assert code == 2 and error.count("\n") == 1 and error.startswith("error: "), (arguments, error)
        return error

    # --output that cannot be a run folder: a file, or a place nothing can be written.
    (tmp_path / "a-file").write_text("x")
    error = one_line_error(["train", str(data), "--output", str(tmp_path / "a-file"), *tiny])
    assert "is an existing file, not a folder; choose another --output" in error
    error = one_line_error(["train", str(data), "--output", "/proc/self/transferkit-run", *tiny])
    assert "cannot create the run folder /proc/self/transferkit-run" in error

    # --weights that are not weights, or a pickle that would run code.
    (tmp_path / "notes.txt").write_text("these are not weights")
    error = one_line_error(["train", str(data), "--output", str(tmp_path / "r1"), *tiny, "--weights", str(tmp_path / "notes.txt")])
    assert "notes.txt cannot be loaded as weights of test_efficientnet (not a PyTorch or safetensors weights file)" in error
    torch.save({"conv_stem.weight": print}, tmp_path / "code.pth")  # unpickling it calls into builtins
    error = one_line_error(["train", str(data), "--output", str(tmp_path / "r2"), *tiny, "--weights", str(tmp_path / "code.pth")])
    assert "code.pth cannot be loaded as weights of test_efficientnet (holds pickled code, refused: Unsupported global" in error

    # A run folder whose files were damaged after they were written.
    for name in ("classes.json", "progress.json", "config.yaml", "model/model.safetensors"):
        run_dir = tmp_path / name.replace("/", "-")
        shutil.copytree(trained_run, run_dir)
        damaged = run_dir / name
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
        (run_dir / "metrics.json").unlink()
        command = ["predict", str(run_dir), str(data)] if name.startswith("model/") else ["train", "--resume", str(run_dir)]
        error = one_line_error(command)
        assert str(damaged.name) in error and ("is damaged" in error or "does not fit" in error), error
    run_dir = tmp_path / "broken-metrics"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "metrics.json").write_text('{"val": ')
    (run_dir / "evaluation" / "val" / "metrics.json").write_text("{")
    error = one_line_error(["report", str(run_dir)])
    assert "metrics.json is damaged" in error


def test_train_piped_to_a_file_prints_a_short_log_that_ends_with_where_to_go_next(
    tmp_path: Path, tiny_weights: Path
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    run_dir = tmp_path / "run"
    # 40 quick head epochs at a rate that overshoots: patience ends the phase early.
    process = subprocess.run(
        [sys.executable, "-m", "transferkit.cli", "train", str(data), "--output", str(run_dir),
         "--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0",
         "--frozen-epochs", "40", "--frozen-patience", "2", "--frozen-lr", "0.5", "--finetune-epochs", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    epoch_line = re.compile(
        r"^(frozen  |finetune) +\d+/\d+  train loss \d\.\d{4} acc \d\.\d{4}  val loss \d\.\d{4} acc \d\.\d{4}  "
        r"lr \d\.\d\de-\d\d +\d+\.\d s$"
    )
    epochs = [line for line in lines if epoch_line.match(line)]
    history = [row.split(",")[:2] for row in (run_dir / "history.csv").read_text().strip().splitlines()[1:]]
    frozen = [epoch for phase, epoch in history if phase == "frozen"]
    assert len(frozen) < 40, "the overshooting head stops early"
    shown = [line.split()[1] for line in epochs if line.startswith("frozen")]
    assert len(shown) <= 7 and shown[0] == "1/40" and shown[-1] == f"{frozen[-1]}/40", "quick epochs: every few, and the last"
    assert [line.split()[1] for line in epochs if line.startswith("finetune")] == ["1/2", "2/2"]
    best = json.loads((run_dir / "progress.json").read_text())["phases"]["frozen"]["best_epoch"]
    assert f"frozen   stopped early: no better validation loss for 2 epochs (best epoch {best})" in lines
    assert {len(line[:line.index("val loss")]) for line in epochs} == {len(epochs[0][:epochs[0].index("val loss")])}, \
        "columns line up"
    assert f"report: {run_dir / 'report.html'}" in lines and (run_dir / "report.html").is_file()
    assert f"run folder: {run_dir} (audit: audit/audit.html)" in lines
    assert lines[-1] == f"next: transferkit predict {run_dir} IMAGES  |  transferkit export {run_dir}  |  transferkit serve {run_dir}"
    assert any("validation images it rests on" in line for line in lines)
    # The wall time is the whole command's: more than the training the metrics time, which starts
    # after the imports (seconds of torch and Lightning).
    wall, to_model = map(float, re.search(
        r"wall time: (\d+\.\d) s \(from reading the data to the saved model: (\d+\.\d) s\)", process.stdout).groups())
    assert wall > to_model == round(json.loads((run_dir / "metrics.json").read_text())["train_seconds"], 1)
    # Not a terminal: no bar redrawn with carriage returns, on either stream; no logger names, no Lightning.
    everything = process.stdout + process.stderr
    assert "\r" not in everything and "it/s" not in everything
    assert "INFO" not in everything and "transferkit." not in everything and "GPU available" not in everything
    assert all(line.startswith("warning: ") for line in process.stderr.splitlines()), process.stderr
    assert "explained" not in everything
    assert len(lines) + len(process.stderr.splitlines()) <= 25


def test_bad_data_folder_is_a_one_line_error(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", per_class=3, classes=("red",))
    process = subprocess.run(
        [sys.executable, "-m", "transferkit.cli", "train", str(tmp_path / "data"), "--output", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert process.returncode == 2
    assert process.stderr.strip().count("\n") == 0
    assert "only one class ('red')" in process.stderr and "at least two class folders" in process.stderr


def test_train_with_relative_paths_then_evaluate_from_elsewhere(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Users type relative paths; the run folder must still work once they cd elsewhere.
    make_folder(tmp_path / "data", per_class=12)
    monkeypatch.chdir(tmp_path)
    code = main([
        "train", "data", "--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64",
        "--num-workers", "0", "--frozen-epochs", "2", "--finetune-epochs", "1", "--no-progress", "--no-report",
    ])
    assert code == 0
    run_dir = next((tmp_path / "runs").iterdir())
    assert "run folder: " + str(run_dir) in capsys.readouterr().out

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(run_dir), "--split", "val", "--no-progress"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_version_and_the_top_level_help_speak_to_a_user(capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert capsys.readouterr().out == f"transferkit {pyproject['project']['version']}\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.startswith("Train an image classifier on your own images")
    assert "dataclass" not in text and "public function" not in text
    assert "transferkit train photos/" in text and "--config" in text


def test_inference_commands_piped_draw_no_bar_unless_asked(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = shutil.copytree(trained_run, tmp_path / "run")  # calibrate writes into the run
    data = make_folder(tmp_path / "data", per_class=6, classes=("blue", "green", "red"))

    def piped(*arguments: str) -> str:
        # Several batches of 4: a bar would be drawn, were it on.
        process = subprocess.run([sys.executable, "-m", "transferkit.cli", *arguments, "--batch-size", "4"],
                                 capture_output=True, text=True, timeout=300)
        assert process.returncode == 0, process.stderr
        return process.stdout + process.stderr

    for arguments in (["predict", str(run_dir), str(data)],
                      ["evaluate", str(run_dir), str(data), "--output", str(tmp_path / "evaluation")],
                      ["calibrate", str(run_dir), str(data)]):
        everything = piped(*arguments)
        assert "\r" not in everything and "batch/s" not in everything, (arguments, everything)
    # Asked for, the bar is drawn even into a pipe.
    assert "batch/s" in piped("predict", str(run_dir), str(data), "--progress")


@pytest.mark.parametrize("command", ["train", "compare", "audit", "evaluate", "predict", "calibrate", "export"])
def test_every_progress_flag_says_it_is_on_only_for_a_terminal(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "--progress, --no-progress" in said and "(default: on when stderr is a terminal)" in said


def test_train_on_a_terminal_shows_a_bar_with_the_time_left_on_each_fine_tuning_epoch(tmp_path: Path, tiny_weights: Path) -> None:
    import os
    import pty

    data = make_folder(tmp_path / "data", per_class=24)
    # A pseudo-terminal: stdout and stderr are a terminal, as for a person at a shell.
    parent, child = pty.openpty()
    environment = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    process = subprocess.Popen(
        [sys.executable, "-m", "transferkit.cli", "train", str(data), "--output", str(tmp_path / "run"),
         "--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0",
         "--batch-size", "8", "--frozen-epochs", "2", "--finetune-epochs", "2", "--finetune-unfreeze", "2",
         "--no-report", "--no-audit"],
        stdin=child, stdout=child, stderr=child, env=environment,
    )
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(parent)
    assert process.wait(timeout=300) == 0, seen.decode(errors="replace")[-2000:]
    screen = seen.decode(errors="replace")
    # Each fine-tuning epoch: Lightning's (Rich) bar with the time spent and the time left (0:00:02 • 0:00:05),
    # then its epoch line as when piped.
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert re.search(r"Epoch 0/1 +━+.* \d+/5 \d:\d\d:\d\d • \d:\d\d:\d\d", plain), plain[-3000:]
    assert re.search(r"finetune +1/2  train loss", plain) and re.search(r"finetune +2/2  train loss", plain)


def test_options_beside_resume_are_refused_with_the_way_to_a_run_that_takes_them(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(trained_run), "--finetune-epochs", "1", "--batch-size", "8"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert "would ignore --finetune-epochs 1 --batch-size 8: drop them" in error
    assert {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()} == before, "the run is untouched"

    # The way the line gives: a new run from the old one's config, with the options applied.
    advice = error.rstrip().split("train a new run with ")[1].replace("NEW_RUN", str(tmp_path / "new"))
    assert main(["train", *advice.split(), "--no-audit", "--no-report"]) == 0
    history = (tmp_path / "new" / "history.csv").read_text().splitlines()
    assert sum(line.startswith("finetune") for line in history) == 1
    assert "batch_size: 8" in (tmp_path / "new" / "config.yaml").read_text()
