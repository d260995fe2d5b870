"""Mixup and CutMix on fine-tuning's batches (timm's Mixup and SoftTargetCrossEntropy)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_folder, tiny_config
from transferkit import train
from transferkit.errors import ConfigError
from transferkit.training.mixing import Mixing, create_mixing


@pytest.mark.parametrize("count", [8, 7, 1])
def test_a_mixed_batch_has_soft_targets_that_sum_to_one_and_mixed_inputs(count: int) -> None:
    torch.manual_seed(0)
    inputs, targets = torch.randn(count, 3, 16, 16), torch.arange(count) % 2  # timm pairs i with count-1-i: other classes
    mixing = Mixing(mixup=0.4, cutmix=0.0, label_smoothing=0.1, num_classes=3)
    mixed, soft = mixing(inputs.clone(), targets)
    assert mixed.shape == inputs.shape and soft.shape == (count, 3)
    assert torch.allclose(soft.sum(dim=1), torch.ones(count))
    pairs = count - count % 2
    if pairs:
        assert not torch.allclose(mixed[:pairs], inputs[:pairs]), "the pairs are mixed"
        smoothed = torch.full((pairs, 3), 0.1 / 3).scatter_(1, targets[:pairs, None], 1 - 0.1 + 0.1 / 3)
        assert not torch.allclose(soft[:pairs], smoothed), "the targets are mixed with the partner's"
        assert (soft[:pairs, 2] == soft[0, 2]).all(), "class 2, in no pair, keeps only the smoothing"
    if count % 2:
        assert torch.equal(mixed[-1], inputs[-1]), "an odd batch's last sample trains unmixed"
        assert soft[-1].argmax() == targets[-1]
    assert math.isfinite(float(mixing.loss(torch.randn(count, 3), soft)))


def test_cutmix_applies_on_images_only(caplog: pytest.LogCaptureFixture) -> None:
    assert create_mixing(0.0, 1.0, 0.1, 3, on_images=False) is None
    assert "--finetune-cutmix is not used" in caplog.text and "--finetune-on images" in caplog.text, "said, not dropped"
    assert create_mixing(0.0, 0.0, 0.1, 3, on_images=True) is None
    assert create_mixing(0.0, 1.0, 0.1, 3, on_images=True).mix.cutmix_alpha == 1.0


@pytest.mark.parametrize(("finetune_on", "options"), [
    ("images", {"finetune_mixup": 0.4, "finetune_cutmix": 1.0}),
    ("activations", {"finetune_mixup": 0.4}),
])
def test_finetuning_with_mixing_trains_on_soft_targets_and_records_it(
    tmp_path: Path, tiny_weights: Path, finetune_on: str, options: dict
) -> None:
    data = make_folder(tmp_path / "data", per_class=15)

    def finetune_rows(name: str, mixing: dict) -> tuple[Path, list[dict[str, str]]]:
        run = train(data, tiny_config(tmp_path / name, tiny_weights, finetune_on=finetune_on,
                                      **{"finetune.epochs": 2, "finetune.patience": 2, **mixing}))
        with (run.run_dir / "history.csv").open() as history:
            return run.run_dir, [row for row in csv.DictReader(history) if row["phase"] == "finetune"]

    run_dir, rows = finetune_rows("mixed", options)
    _, plain = finetune_rows("plain", {})
    assert len(rows) == 2
    assert all(math.isfinite(float(row[key])) for row in rows for key in ("train_loss", "val_loss"))
    # The same seed, batches and weights: only the mixing can move the training loss.
    assert [row["train_loss"] for row in rows] != [row["train_loss"] for row in plain], "the batches were mixed"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["finetune_mixup"] == 0.4 and saved["finetune_cutmix"] == options.get("finetune_cutmix", 0.0)


def test_mixing_options_are_checked_together(tmp_path: Path, tiny_weights: Path) -> None:
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, tiny_weights, finetune_mixup=-0.2, finetune_cutmix=1.0, finetune_on="activations",
                    class_balance="weight")
    text = str(error.value)
    assert "--finetune-mixup must be 0 or more, got -0.2" in text
    assert "--class-balance weight does not combine with --finetune-mixup" in text
    assert "--finetune-cutmix needs fine-tuning on images" in text
