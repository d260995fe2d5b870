from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import history_rows, make_folder

from transferkit.cli import main
from transferkit.config import DataConfig, TrainConfig, parse_unfreeze
from transferkit.errors import ConfigError


def test_the_defaults_are_a_valid_config_without_a_data_source() -> None:
    config = TrainConfig()
    assert "source" not in {spec.name for spec in dataclasses.fields(DataConfig)}
    assert config.frozen.epochs == 30 and config.finetune.unfreeze == "auto"


def test_auto_unfreeze_trains_six_blocks_from_four_thousand_training_images() -> None:
    sizes = (None, 244, 2_934, 3_999, 4_000, 50_000)
    assert [parse_unfreeze("auto", size) for size in sizes] == [3, 3, 3, 3, 6, 6]
    assert parse_unfreeze(" Auto ", 50_000) == 6 and parse_unfreeze("4", 50_000) == 4


def test_flat_options_override_the_defaults_and_leave_the_rest() -> None:
    config = TrainConfig.from_options({"frozen.epochs": 6, "data.image_size": 64, "model.name": "resnet18", "seed": 7})
    assert (config.frozen.epochs, config.data.image_size, config.model.name, config.seed) == (6, 64, "resnet18", 7)
    assert config.frozen.lr == TrainConfig().frozen.lr and config.finetune == TrainConfig().finetune


def test_unknown_keys_and_invalid_values_are_raised_together() -> None:
    with pytest.raises(ConfigError) as raised:
        TrainConfig.from_options({"frozen.epoch": 3, "data": {}, "data.split": (0.5, 0.6, 0.1), "seed": -1})
    problems = raised.value.problems
    assert problems[0] == (
        "'frozen.epoch' is not a TrainConfig option. Did you mean: frozen.epochs, frozen.warmup_epochs, frozen.patience?"
    )
    assert problems[1].startswith("'data' is not a TrainConfig option.")
    assert any(p.startswith("--split fractions must sum to 1") for p in problems)
    assert any(p.startswith("--seed must be between 0 and") for p in problems)
    assert len(problems) == 4


def test_the_saved_record_keeps_the_run_folder_layout_with_the_source_first() -> None:
    config = TrainConfig.from_options({"data.image_size": 64})
    record = config.to_record("photos")
    assert list(record) == [spec.name for spec in dataclasses.fields(TrainConfig)]
    assert list(record["data"])[:2] == ["source", "split"] and record["data"]["source"] == "photos"
    source, loaded = TrainConfig.from_record(record)
    assert (source, loaded) == ("photos", config)
    with pytest.raises(ValueError, match="names no data.source"):
        TrainConfig.from_record(config.to_dict())


def test_train_without_data_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transferkit import train

    with pytest.raises(ConfigError, match="DATA is required"):
        train("", TrainConfig(output=str(tmp_path / "run")))
    assert main(["train", "--split", "0.5,0.6,0.1", "--output", str(tmp_path / "run")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0] == "error: DATA is required: give an image folder or a registered dataset name"
    assert errors[1].startswith("error: --split fractions must sum to 1") and len(errors) == 2
    assert not (tmp_path / "run").exists()


def _tiny_flags(weights: Path) -> list[str]:
    return ["--model", "test_efficientnet", "--weights", str(weights), "--image-size", "64", "--num-workers", "0",
            "--batch-size", "16", "--frozen-lr", "0.01", "--finetune-unfreeze", "2", "--no-report", "--no-progress"]




def test_a_run_folders_config_file_trains_the_same_run_again(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    first, again = tmp_path / "first", tmp_path / "again"
    # Not the defaults: the file must carry the seed, the split and the phases, not luck.
    assert main(["train", str(data), "--output", str(first), *_tiny_flags(tiny_weights), "--seed", "3",
                 "--split", "0.7,0.2,0.1", "--frozen-epochs", "3", "--finetune-epochs", "1", "--no-audit"]) == 0

    assert main(["train", "--config", str(first / "config.yaml"), "--output", str(again)]) == 0

    assert (again / "splits.csv").read_text() == (first / "splits.csv").read_text()
    before, after = history_rows(first), history_rows(again)
    assert [(row["phase"], row["epoch"]) for row in after] == [(row["phase"], row["epoch"]) for row in before]
    assert len(before) == 4
    for old, new in zip(before, after):
        for column in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert float(new[column]) == pytest.approx(float(old[column]), abs=1e-6), (old["phase"], column)
    records = [yaml.safe_load((run / "config.yaml").read_text()) for run in (first, again)]
    assert records[1]["output"] == str(again), "a run's own folder is not where its reproduction goes"
    assert {**records[1], "output": None} == {**records[0], "output": None}

    # The audit reads the same file: the run's images and backbone; the phases mean nothing to it.
    audited = tmp_path / "audit"
    assert main(["audit", "--config", str(first / "config.yaml"), "--output", str(audited), "--folds", "2",
                 "--no-html"]) == 0
    audit_record = json.loads((audited / "audit.json").read_text())
    assert audit_record["model"] == "test_efficientnet" and audit_record["images"] == 24


def test_flags_override_the_config_file_and_the_rest_of_it_stands(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=8)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({
        "data": {"source": str(data), "image_size": 64, "num_workers": 0, "batch_size": 16},
        "model": {"name": "test_efficientnet", "weights": str(tiny_weights)},
        "frozen": {"epochs": 4, "lr": 0.01},
        "finetune": {"epochs": 0},
        "seed": 5, "report": False, "audit": False, "progress": False,
    }))

    assert main(["train", "--config", str(experiment), "--frozen-epochs", "2", "--seed", "9",
                 "--output", str(tmp_path / "run")]) == 0

    record = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (record["frozen"]["epochs"], record["seed"]) == (2, 9)
    assert (record["frozen"]["lr"], record["data"]["image_size"], record["data"]["source"]) == (0.01, 64, str(data))
    assert [row["phase"] for row in history_rows(tmp_path / "run")] == ["frozen", "frozen"]


def test_an_unknown_key_or_a_wrong_type_is_one_line_naming_it_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("data:\n  source: photos\n  image_size: big\nfrozen:\n  epoch: 3\nseed: 7\nreport: maybe\n")

    assert main(["train", "--config", str(experiment), "--output", str(tmp_path / "run")]) == 2

    assert capsys.readouterr().err.splitlines() == [
        f"error: {experiment}: data.image_size must be a whole number, got 'big'",
        f"error: {experiment}: unknown key 'frozen.epoch'. Did you mean: frozen.epochs, frozen.warmup_epochs, frozen.patience?",
        f"error: {experiment}: report must be true or false, got 'maybe'",
    ]
    assert not (tmp_path / "run").exists()


def test_compare_takes_the_files_data_and_model_and_sets_the_phases_itself(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=8)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({
        "data": {"source": str(data), "image_size": 64, "num_workers": 0},
        "model": {"name": "test_efficientnet", "weights": str(tiny_weights)},
        "frozen": {"epochs": 9}, "batchnorm": "train", "output": str(tmp_path / "elsewhere"),
        "report": False, "audit": False, "progress": False,
    }))

    assert main(["compare", "--config", str(experiment), "--strategies", "frozen", "--epochs", "1",
                 "--output", str(tmp_path / "comparison")]) == 0

    record = yaml.safe_load((tmp_path / "comparison" / "frozen" / "config.yaml").read_text())
    assert (record["model"]["name"], record["data"]["image_size"], record["data"]["source"]) == (
        "test_efficientnet", 64, str(data))
    assert record["frozen"]["epochs"] == 1 and record["batchnorm"] == "frozen", "the strategy's, not the file's"
    assert not (tmp_path / "elsewhere").exists()
