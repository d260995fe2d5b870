from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_folder
from transferkit.cli import main


def test_help_lists_the_train_command_and_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--weights", "--split", "--frozen-epochs", "--finetune-unfreeze", "--resume",
                 "--class-balance", "--batchnorm", "--precision", "--devices", "--max-per-class"):
        assert flag in text, flag


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--split", "0.5,0.6,0.1"], "--split fractions must sum to 1"),
        (["--frozen-optimizer", "lion"], "--frozen-optimizer must be one of adamw, adam, sgd, rmsprop"),
        (["--finetune-unfreeze", "many"], "--finetune-unfreeze must be a block count"),
        (["--model", "efficientnet_lite9"], "unknown model 'efficientnet_lite9'.*Did you mean"),
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
    import re

    assert re.search(message, error), error
    assert all(line.startswith("error: ") for line in error.strip().splitlines())


def test_bad_data_folder_is_a_one_line_error(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", per_class=3, classes=("red",))
    process = subprocess.run(
        [sys.executable, "-m", "transferkit.cli", "train", str(tmp_path / "data"), "--output", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert process.returncode == 2
    assert process.stderr.strip().count("\n") == 0
    assert "only one class ('red')" in process.stderr and "at least two class folders" in process.stderr
