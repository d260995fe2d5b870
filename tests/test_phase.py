"""What both ways of training a phase share (the schedule, the epoch order) and the fine-tuning
policy: what trains, batch norm, the parameter groups and their learning rates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_MODEL, tiny_config
from transferkit import train
from transferkit.models.create import create_classifier
from transferkit.models.freeze import backbone_blocks, count_parameters
from transferkit.config import ModelConfig, PhaseConfig
from transferkit.training.lightning import FineTuning
from transferkit.training.phase import EpochSampler, Schedule, set_learning_rates


def tiny(weights: Path) -> nn.Module:
    return create_classifier(ModelConfig(name=TINY_MODEL, weights=str(weights)), num_classes=3)


def test_step_and_plateau_schedules_equal_torchs_own_schedulers() -> None:
    epochs, steps_per_epoch = 7, 4
    losses = [1.0, 0.8, 0.8, 0.81, 0.5, 0.5, 0.5]
    parameter = nn.Parameter(torch.zeros(1))
    for kind in ("step", "plateau"):
        optimizer = torch.optim.SGD([parameter], lr=0.3)
        if kind == "step":
            reference = torch.optim.lr_scheduler.StepLR(optimizer, step_size=epochs // 3, gamma=0.1)
        else:
            reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=1)
        schedule = Schedule(kind, lr=0.3, epochs=epochs, steps_per_epoch=steps_per_epoch)
        for epoch, loss in enumerate(losses):
            for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
                assert schedule.lr_at(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), (kind, step)
            schedule.end_epoch(loss)
            optimizer.step()  # no gradient, no change: only so torch's scheduler steps in its expected order
            if isinstance(reference, torch.optim.lr_scheduler.ReduceLROnPlateau):
                reference.step(loss)
            else:
                reference.step()


def test_cosine_warms_up_linearly_then_decays_to_a_hundredth() -> None:
    schedule = Schedule("cosine", lr=1.0, epochs=10, steps_per_epoch=10, warmup_epochs=1.0)
    rates = [schedule.lr_at(step) for step in range(100)]
    assert rates[:10] == pytest.approx([(k + 1) / 11 for k in range(10)])
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])), "decays after the warm-up"
    assert schedule.lr_at(100) == pytest.approx(0.01)


def test_a_resumed_schedule_continues_where_the_plateau_left_it() -> None:
    losses = [1.0, 0.9, 0.9, 0.95, 0.5, 0.5, 0.49999, 0.5, 0.5]
    whole = Schedule("plateau", lr=1.0, epochs=9, steps_per_epoch=2)
    for loss in losses[:3]:  # the best so far and one epoch without a better one
        whole.end_epoch(loss)
    resumed = Schedule("plateau", lr=1.0, epochs=9, steps_per_epoch=2)
    resumed.load_state_dict(whole.state_dict())  # what a checkpoint after epoch 3 carries
    for epoch, loss in enumerate(losses[3:], start=3):
        whole.end_epoch(loss)
        resumed.end_epoch(loss)
        assert resumed.lr_at(2 * epoch + 2) == whole.lr_at(2 * epoch + 2), epoch
    assert whole.lr_at(17) < 0.1, "the plateau reduced the rate more than once"


def test_epoch_order_depends_on_seed_and_epoch_alone() -> None:
    sampler = EpochSampler(50, seed=3)
    sampler.set_epoch(4)
    fourth = list(sampler)
    assert sorted(fourth) == list(range(50))
    other = EpochSampler(50, seed=3)
    other.set_epoch(4)
    assert list(other) == fourth, "a resumed run draws the same order without any saved state"
    other.set_epoch(5)
    assert list(other) != fourth
    weighted = EpochSampler(1000, seed=3, weights=torch.tensor([1.0] * 500 + [9.0] * 500))
    assert sum(index >= 500 for index in weighted) > 800, "balanced sampling draws by weight, with replacement"


def test_finetuning_trains_the_top_blocks_and_gives_the_head_its_multiple(tiny_weights: Path) -> None:
    model = tiny(tiny_weights)
    phase = PhaseConfig(lr=1e-3, head_lr_multiplier=10.0, weight_decay=0.05)
    policy = FineTuning("finetune", phase, unfreeze=1, batchnorm="frozen")
    policy.freeze_before_training(model)
    top = set(backbone_blocks(model)[-1])
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == top | head
    assert policy.parameters == count_parameters(model)

    optimizer = policy.create_optimizer(model)
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}, "the optimizer holds trainable parameters only"
    set_learning_rates(optimizer, 2e-4)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == pytest.approx({"backbone": 2e-4, "backbone_no_decay": 2e-4, "head": 2e-3, "head_no_decay": 2e-3})

    alone = FineTuning("frozen", phase, unfreeze=0, batchnorm="frozen")
    alone.freeze_before_training(model)
    optimizer = alone.create_optimizer(model)
    set_learning_rates(optimizer, 2e-4)
    assert {group["name"]: group["lr"] for group in optimizer.param_groups} == pytest.approx(
        {"head": 2e-4, "head_no_decay": 2e-4}
    ), "a head training alone trains at the phase's rate"


def test_a_real_finetune_trains_the_head_at_its_multiple_of_the_backbone_rate(
    image_folder: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    config = tiny_config(
        tmp_path / "run", tiny_weights,
        **{"frozen.epochs": 1, "finetune.epochs": 1, "finetune.unfreeze": "2", "finetune.head_lr_multiplier": 5.0,
           "finetune.scheduler": "constant", "finetune.lr": 1e-4},
    )
    train(image_folder, config)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "finetune-last.ckpt", map_location="cpu", weights_only=True)
    rates = {group["name"]: group["lr"] for group in checkpoint["optimizer_states"][0]["param_groups"]}
    assert rates["backbone"] == pytest.approx(1e-4) and rates["head"] == pytest.approx(5e-4)
    assert math.isclose(rates["head_no_decay"] / rates["backbone_no_decay"], 5.0)
