from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_folder, tiny_config
from PIL import Image

from transferkit import train
from transferkit.training import config  # where --finetune-unfreeze auto reads its thresholds
from transferkit.models.freeze import unfreeze_top
from transferkit._io import read_csv_rows
from transferkit.cli import main
from transferkit.models.folder import load_model
from transferkit.commands.summary import summarize


def test_summary_of_a_run_counts_what_each_phase_really_trained(trained_run: Path) -> None:
    summary = summarize(trained_run)

    logged = json.loads((trained_run / "progress.json").read_text())["phases"]
    assert summary.trainable == {phase: logged[phase]["trainable_parameters"] for phase in ("frozen", "finetune")}
    model, _ = load_model(trained_run / "model")
    assert summary.total_parameters == sum(p.numel() for p in model.parameters())
    assert sum(row.parameters for row in summary.rows if row.leaf) == summary.total_parameters

    by_name = {row.name: row for row in summary.rows}
    assert by_name["classifier"].trains_in == "both" and by_name["classifier"].output_shape == (3,)
    assert by_name["conv_stem"].trains_in == "frozen"
    finetuned = sum(row.parameters for row in summary.rows if row.leaf and row.trains_in in ("finetune", "both"))
    assert finetuned == summary.trainable["finetune"]
    assert "trainable in the fine-tuning phase" in summary.table()


@pytest.mark.parametrize(("many_from", "blocks"), [(40, 4), (49, 3)])
def test_auto_unfreeze_trains_more_blocks_on_a_large_training_set_and_summary_says_so(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, many_from: int, blocks: int
) -> None:
    # The rule scaled down to a test's size: 4 blocks (of the tiny model's 6, so not "all") from
    # MANY_FROM training images, where the real rule is 6 blocks from 4,000. The folder's 60 images
    # split into 48 training images, so 49 counts the training split, not the folder.
    monkeypatch.setattr(config, "MANY_BLOCKS", 4)
    monkeypatch.setattr(config, "MANY_BLOCKS_FROM", many_from)
    data = make_folder(tmp_path / "data", per_class=30)
    run = tmp_path / "run"
    train(data, tiny_config(run, tiny_weights, **{"finetune.unfreeze": "auto"}))

    assert (run / "config.yaml").read_text().count("unfreeze: auto") == 1
    assert sum(row["split"] == "train" for row in read_csv_rows(run / "splits.csv")) == 48
    model, _ = load_model(run / "model")
    unfreeze_top(model, blocks)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    finetune = json.loads((run / "metrics.json").read_text())["phases"]["finetune"]
    assert finetune["trained_blocks"] == blocks, "metrics.json says what auto chose"
    assert finetune["trainable_parameters"] == expected and summarize(run).trainable["finetune"] == expected


def test_summary_command_for_a_model_name_writes_the_table_and_diagram(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["summary", "test_efficientnet", "--num-classes", "5", "--output", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert "classifier" in out and "total parameters" in out
    table = tmp_path / "test_efficientnet-architecture.txt"
    assert table.read_text().splitlines()[0].startswith("test_efficientnet, input 3x")
    with Image.open(tmp_path / "test_efficientnet-architecture.png") as image:
        assert image.format == "PNG" and image.height > 600


def test_summary_of_an_unknown_model_is_one_line_with_close_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "efficientnet_lite00"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "efficientnet_lite0" in error and "\n" not in error
