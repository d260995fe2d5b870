"""``transferkit lr-find`` and ``transferkit.lr_find``: the sweep train's ``auto`` runs, on its own,
printed in one line and written as a plot and a CSV of (rate, loss)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL, make_folder, tiny_config
from PIL import Image

import transferkit
from transferkit.cli import main
from transferkit.training.lr_find import MAX_LR, MIN_LR, STEPS


def read_sweep(table: Path) -> tuple[list[float], list[float]]:
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [float(row["learning_rate"]) for row in rows], [float(row["smoothed_loss"]) for row in rows]


def test_the_command_prints_the_suggestion_and_writes_the_plot_and_the_table(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=20)
    out = tmp_path / "found"
    status = main(["lr-find", str(data), "--model", TINY_MODEL, "--weights", str(tiny_weights), "--image-size", "64",
                   "--batch-size", "16", "--num-workers", "0", "--no-progress", "--output", str(out)])
    assert status == 0
    printed = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"suggested --frozen-lr (\S+) \(the steepest fall .*", printed[-1])
    assert match, printed
    rate = float(match.group(1))
    rates, losses = read_sweep(out / "lr-find-frozen.csv")
    assert 10 < len(rates) <= STEPS and rates == sorted(rates) and rates[0] == pytest.approx(MIN_LR)
    assert rates[0] <= rate <= rates[-1] <= MAX_LR
    chosen = min(range(len(rates)), key=lambda i: abs(rates[i] - rate))
    assert rates[chosen] == pytest.approx(rate, rel=5e-3), "the printed rate is one the sweep tried"
    assert losses[chosen] < losses[0], "the suggestion lies where the loss falls"
    assert Image.open(out / "lr-find-frozen.png").size[0] > 300
    assert sorted(path.name for path in out.iterdir()) == ["lr-find-frozen.csv", "lr-find-frozen.png"]


def test_the_function_suggests_the_rate_train_auto_would_use(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=20)
    config = tiny_config(tmp_path / "unused", tiny_weights, **{"finetune.epochs": 0})
    found = transferkit.lr_find(data, config, output=tmp_path / "found", progress=False)
    assert found.found and found.suggestion in found.rates
    assert f"--frozen-lr {found.suggestion:.2e}" in found.line()
    assert found.plot == tmp_path / "found" / "lr-find-frozen.png" and found.plot.is_file()
    assert read_sweep(found.table) == (found.rates, found.losses)
    assert not (tmp_path / "unused").exists(), "lr-find writes no run folder"
    run = transferkit.train(data, config.with_options({"frozen.lr": "auto", "output": str(tmp_path / "run")}),
                            progress=False)
    assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["frozen"]["lr"] == found.suggestion


def test_the_finetune_sweep_starts_from_a_trained_head(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=20)
    head = {"frozen.lr": 0.1, "frozen.epochs": 6}
    trained = transferkit.lr_find(data, tiny_config(tmp_path / "run", tiny_weights, **head), phase="finetune",
                                  output=tmp_path / "trained", progress=False)
    fresh = transferkit.lr_find(data, tiny_config(tmp_path / "run", tiny_weights, **{"frozen.epochs": 0}),
                                phase="finetune", output=tmp_path / "fresh", progress=False)
    for result in (trained, fresh):
        assert MIN_LR <= result.suggestion <= MAX_LR and result.plot.is_file() and result.table.is_file()
        assert result.plot.name == "lr-find-finetune.png"
    # Six epochs of the head have already learned the colours: the sweep's first loss is lower.
    assert trained.losses[0] < fresh.losses[0] - 0.02, (trained.losses[0], fresh.losses[0])


def test_a_missing_data_folder_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", str(tmp_path / "no-such-folder"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "no-such-folder" in error[0], error
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["lr-find", str(tmp_path), "--phase", "finetun"])
    assert "did you mean finetune?" in capsys.readouterr().err
    with pytest.raises(transferkit.ConfigError, match="--phase must be one of frozen, finetune, got 'head'"):
        transferkit.lr_find(tmp_path, phase="head")
