from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import COLOURS, history_rows, make_folder, make_image, tiny_config

from transferkit import predict, train
from transferkit.cli import main
from transferkit.config import TrainConfig
from transferkit.data.config import flat_options
from transferkit.errors import ConfigError
from transferkit.training.presets import PRESETS, parse_duration


def _tiny_flags(weights: Path) -> list[str]:
    return ["--model", "test_efficientnet", "--weights", str(weights), "--image-size", "64", "--num-workers", "0",
            "--batch-size", "16", "--frozen-lr", "0.01", "--finetune-unfreeze", "2", "--no-progress", "--no-audit"]






def test_fast_is_the_default_and_every_preset_sets_its_options_under_the_ones_given() -> None:
    assert TrainConfig.from_options({"preset": "fast"}) == TrainConfig()
    for name, options in PRESETS.items():
        resolved = flat_options(TrainConfig.from_options({"preset": name}).to_dict())
        assert {key: resolved[key] for key in options} == options, name
        given = TrainConfig.from_options({"preset": name, "finetune.epochs": 1, "seed": 7})
        assert (given.finetune.epochs, given.seed, given.preset) == (1, 7, name)


def test_a_new_preset_replaces_the_old_ones_values_and_keeps_those_changed_from_it() -> None:
    mine = TrainConfig.from_options({"preset": "best", "finetune.epochs": 2, "seed": 3})
    now = mine.with_options({"preset": "balanced"})
    expected = TrainConfig.from_options({"preset": "balanced", "finetune.epochs": 2, "seed": 3})
    assert now == expected
    assert now.model.name == TrainConfig().model.name != mine.model.name, "best's backbone went with best"


def test_a_wrong_preset_or_time_limit_is_one_line_naming_the_fix() -> None:
    with pytest.raises(ConfigError) as raised:
        TrainConfig.from_options({"preset": "balnced", "time_limit": "twenty"})
    text = str(raised.value)
    assert "--preset must be one of fast, balanced, best, auto, got 'balnced' Did you mean: balanced?" in text
    assert "--time-limit must be a duration like 20m, 90s or 1.5h, got 'twenty'" in text
    assert [parse_duration(text) for text in ("90s", "20m", "1.5h", "1h30m", "2")] == [90, 1200, 5400, 5400, 120]


def test_the_preset_its_options_and_the_estimate_reach_config_yaml_the_console_and_the_report(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    run = tmp_path / "run"

    # Given with the preset, --finetune-epochs wins; the preset's views and blocks stand.
    assert main(["train", str(data), "--output", str(run), *_tiny_flags(tiny_weights), "--preset", "balanced",
                 "--frozen-epochs", "2", "--finetune-epochs", "2"]) == 0

    shown = capsys.readouterr().out
    assert "estimated time: about " in shown and "(preset balanced: 24 images, fine-tuning 2 of " in shown
    assert shown.index("estimated time") < shown.index("1/2  train loss")
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["preset"] == "balanced" and record["time_limit"] is None
    assert (record["finetune"]["epochs"], record["finetune"]["unfreeze"]) == (2, "2")
    assert record["finetune_views"] == PRESETS["balanced"]["finetune_views"]
    assert record["finetune"]["patience"] == PRESETS["balanced"]["finetune.patience"]
    assert "preset: balanced" in (run / "report.html").read_text()


def test_a_config_file_value_overrides_its_preset_and_python_takes_preset(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=8)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({
        "data": {"source": str(data), "image_size": 64, "num_workers": 0, "batch_size": 16},
        "model": {"name": "test_efficientnet", "weights": str(tiny_weights)},
        "preset": "balanced", "finetune": {"epochs": 1, "unfreeze": "2"}, "frozen": {"epochs": 2},
        "report": False, "audit": False, "progress": False,
    }))
    assert main(["train", "--config", str(experiment), "--output", str(tmp_path / "from-file")]) == 0
    record = yaml.safe_load((tmp_path / "from-file" / "config.yaml").read_text())
    assert (record["preset"], record["finetune"]["epochs"], record["finetune"]["patience"]) == (
        "balanced", 1, PRESETS["balanced"]["finetune.patience"])

    result = train(data, tiny_config(tmp_path / "python", tiny_weights, **{"frozen.epochs": 2}), preset="balanced")
    record = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert (record["preset"], record["finetune"]["epochs"]) == ("balanced", 1), "tiny_config's one epoch stands"
    assert record["finetune_views"] == PRESETS["balanced"]["finetune_views"]


def test_a_very_short_time_limit_still_ends_with_a_usable_model_and_says_where_it_stopped(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    run = tmp_path / "run"

    assert main(["train", str(data), "--output", str(run), *_tiny_flags(tiny_weights), "--time-limit", "1s",
                 "--frozen-epochs", "300", "--frozen-patience", "300", "--finetune-epochs", "50",
                 "--finetune-patience", "50", "--no-report"]) == 0

    shown = capsys.readouterr().out
    # No preset given: the limit chose one, fast when none fits.
    assert "--time-limit 1s: preset fast (" in shown and "none fits, so phases stop at the limit" in shown
    assert "frozen   stopped at the time limit after " in shown and "finetune stopped at the time limit after " in shown
    history = history_rows(run)
    assert 1 <= sum(row["phase"] == "frozen" for row in history) < 300
    assert 1 <= sum(row["phase"] == "finetune" for row in history) < 50
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["phases"]["frozen"]["stopped_at_time_limit"] is True
    assert metrics["phases"]["finetune"]["stopped_at_time_limit"] is True
    assert yaml.safe_load((run / "config.yaml").read_text())["preset"] == "fast", "auto is saved as what it chose"
    image = make_image(tmp_path / "new" / "red.jpg", COLOURS["red"], seed=99)
    answer = predict(run, [image], top_k=2, progress=False).predictions[0]
    assert sorted(answer.labels) == ["blue", "red"] and abs(sum(answer.probabilities) - 1) < 1e-5


def test_compare_gives_every_run_the_preset_but_its_phases_and_refuses_auto(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=8)
    flags = ["--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0", "--batch-size", "16",
             "--no-progress", "--no-audit", "--no-report"]
    assert main(["compare", str(data), "--strategies", "frozen", "--preset", "auto", *flags,
                 "--output", str(tmp_path / "refused")]) == 2
    assert "--preset auto chooses per run" in capsys.readouterr().err

    assert main(["compare", str(data), "--strategies", "frozen", "--models", "test_efficientnet", "--preset",
                 "balanced", "--epochs", "2", *flags, "--output", str(tmp_path / "compared")]) == 0
    record = yaml.safe_load((tmp_path / "compared" / "frozen" / "config.yaml").read_text())
    assert (record["preset"], record["frozen"]["epochs"], record["finetune"]["epochs"]) == ("balanced", 2, 0)
    assert record["finetune_views"] == PRESETS["balanced"]["finetune_views"]


def test_an_option_given_beside_an_auto_preset_stays_whatever_preset_the_limit_picks() -> None:
    # Values equal to the defaults too: --model tf_efficientnet_lite0 must not become best's Lite2.
    config = TrainConfig.from_options({"time_limit": "1h", "model.name": "tf_efficientnet_lite0", "finetune_views": 0})
    assert config.preset == "auto" and config.preset_overrides == ("finetune_views", "model.name")
    for name in ("balanced", "best"):
        chosen = config.with_options({"preset": name})
        assert (chosen.model.name, chosen.finetune_views) == ("tf_efficientnet_lite0", 0), name
        assert chosen.finetune.epochs == PRESETS[name]["finetune.epochs"], "the preset's own options still apply"
