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
        ({**written, "num_classes": 7}, "model.safetensors does not fit the model config.json describes \\(.*size mismatch for classifier.weight"),
        ({**written, "transferkit": {**written["transferkit"], "format_version": 9}}, "was written by a newer transferkit \\(format 9\\); upgrade transferkit"),
    ]:
        model_config.write_text(json.dumps(damage))
        for command in (["evaluate", str(newer), "--split", "val"], ["predict", str(newer), str(trained_run / "splits.csv")]):
            assert main(command) == 2
            error = capsys.readouterr().err
            assert error.count("\n") == 1 and re.search(message, error), (command, error)


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
