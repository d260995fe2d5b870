from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

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
