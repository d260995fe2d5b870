"""The learning-rate finder: Lightning's sweep on the fine-tuning phase, the same sweep on the head's
cached features, ``--frozen-lr auto`` / ``--finetune-lr auto`` resolved into config.yaml."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, make_folder, tiny_config
from PIL import Image

from transferkit import train
from transferkit.cli import main
from transferkit.config import ModelConfig, PhaseConfig, TrainConfig
from transferkit.errors import ConfigError
from transferkit.models.create import classifier_path, create_classifier
from transferkit.run.folder import RunFolder
from transferkit.training.head_loop import LabelledFeatures
from transferkit.training.lightning import FineTuning, ImageClassifier
from transferkit.training.lr_find import MAX_LR, MIN_LR, STEPS, suggestion, sweep_head, sweep_with_lightning
from transferkit.training.phase import EpochSampler


def test_auto_sweeps_both_phases_records_the_rates_and_draws_the_sweeps(
    tmp_path: Path, tiny_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_folder(tmp_path / "data", per_class=20)
    epochs = logging.getLogger("transferkit.epochs")  # the console's lines, wherever a handler sends them
    epochs.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="transferkit.epochs"):
            run = train(data, tiny_config(tmp_path / "run", tiny_weights, **{"frozen.lr": "auto", "finetune.lr": "auto"}))
    finally:
        epochs.removeHandler(caplog.handler)
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    printed = caplog.text
    for phase in ("frozen", "finetune"):
        rate = saved[phase]["lr"]
        assert isinstance(rate, float) and math.isfinite(rate) and MIN_LR <= rate <= MAX_LR, (phase, rate)
        plot = run.run_dir / "figures" / f"lr-find-{phase}.png"
        assert Image.open(plot).size[0] > 300
        assert f"{phase}: learning rate {rate:.2e} found by the lr finder" in printed
    history = (run.run_dir / "history.csv").read_text().splitlines()
    assert any(line.startswith("frozen,") for line in history) and any(line.startswith("finetune,") for line in history)
    # The recorded rates train the same run again: config.yaml holds numbers, not auto.
    again = RunFolder(run.run_dir).read_config()
    assert again.frozen.lr == saved["frozen"]["lr"] and again.finetune.lr == saved["finetune"]["lr"]


def test_the_head_sweep_leaves_the_head_as_it_found_it_and_suggests_a_rate_in_its_range(tiny_weights: Path) -> None:
    torch.manual_seed(0)
    model = create_classifier(ModelConfig(name=TINY_MODEL, weights=str(tiny_weights)), num_classes=2)
    features = torch.randn(64, model.num_features)
    targets = (features[:, 0] > 0).long()  # a rule a linear head can learn
    before = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
    finder = sweep_head(model, PhaseConfig(lr=MIN_LR), LabelledFeatures(features, targets), torch.nn.CrossEntropyLoss(),
                        EpochSampler(64, seed=0), batch_size=16, drop_rate=0.0)
    after = model.get_classifier().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    rates, losses = finder.results["lr"], finder.results["loss"]
    assert rates == sorted(rates) and rates[0] == MIN_LR and len(rates) <= STEPS
    rate = suggestion(finder, fallback=1e-3, name="frozen")
    assert rate in rates[10:] and rate != 1e-3
    assert losses[rates.index(rate)] < losses[0], "the suggestion lies where the loss falls"


def test_lightnings_sweep_puts_the_fine_tuned_weights_back(tiny_weights: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_classifier(ModelConfig(name=TINY_MODEL, weights=str(tiny_weights)), num_classes=2)
    images = torch.randn(32, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(32) % 2), batch_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = ImageClassifier(model, torch.nn.CrossEntropyLoss(), FineTuning("finetune", PhaseConfig(lr=MIN_LR), 1, "frozen"))
    finder = sweep_with_lightning(module, loader, {"accelerator": "cpu", "devices": 1}, False, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights and batch-norm statistics"
    assert len(finder.results["lr"]) > 10 and finder.results["lr"][0] == pytest.approx(MIN_LR)
    assert classifier_path(model)  # the head is still where checkpoints name it
    assert not list(tmp_path.iterdir()), "the checkpoint the weights came back from is gone"


def test_lr_takes_a_number_or_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert TrainConfig.from_options({"frozen.lr": "auto"}).frozen.lr == "auto"
    with pytest.raises(ConfigError, match="--finetune-lr must be a number or auto, got 'fast'"):
        TrainConfig.from_options({"finetune.lr": "fast"})
    data = make_folder(tmp_path / "data", per_class=3)
    with pytest.raises(SystemExit):
        main(["train", str(data), "--frozen-lr", "quick"])
    assert "expected a number or auto, got 'quick'" in capsys.readouterr().err


def test_a_head_trained_on_images_is_swept_by_lightning(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_folder(tmp_path / "data", per_class=10)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    # An augmented head phase cannot read cached features: it trains, and is swept, on images.
    run = train(data, tiny_config(tmp_path / "run", tiny_weights, **{"frozen.lr": "auto", "frozen.augment": "light",
                                                                      "frozen.epochs": 1, "finetune.epochs": 0}))
    rate = RunFolder(run.run_dir).read_config().frozen.lr
    assert isinstance(rate, float) and MIN_LR <= rate <= MAX_LR
    assert (run.run_dir / "figures" / "lr-find-frozen.png").is_file()
    assert not (run.run_dir / "figures" / "lr-find-finetune.png").exists(), "a phase with no epochs is not swept"
    assert [row.phase for row in RunFolder(run.run_dir).read_history()] == ["frozen"]
    assert not list((tmp_path / "cwd").iterdir()), "the sweep's checkpoint stays in the run folder"
