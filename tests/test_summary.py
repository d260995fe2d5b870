from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from transferkit.cli import main
from transferkit.models import load_model
from transferkit.summary import summarize


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
