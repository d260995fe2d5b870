"""What both ways of training a phase share: the learning rate of each step, the order of each
epoch, the loss, and the epoch's line in history and on the console."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.config import PhaseConfig
from transferkit.models.freeze import count_parameters
from transferkit.run.folder import RunFolder
from transferkit.run.records import EpochRecord

log = logging.getLogger(__name__)
epoch_log = logging.getLogger("transferkit.epochs")
"""One line per epoch: the console a person reads, as Keras, fastai and Ultralytics print."""

PLATEAU_FACTOR, PLATEAU_PATIENCE, PLATEAU_THRESHOLD = 0.1, 1, 1e-4


@dataclass
class Schedule:
    """The learning rate of every step of a phase, for the head loop and the image phases alike.

    ``lr_at(step)`` is a function of the step, so a resumed phase needs no scheduler state;
    'plateau' alone also depends on the validation losses so far (``end_epoch``), as torch's
    ReduceLROnPlateau does with factor 0.1 and patience 1.
    """

    kind: str
    lr: float
    epochs: int
    steps_per_epoch: int
    warmup_epochs: float = 0.0
    plateau_scale: float = 1.0
    plateau_best: float = math.inf
    plateau_bad_epochs: int = 0

    @classmethod
    def for_phase(cls, phase: PhaseConfig, steps_per_epoch: int) -> Schedule:
        return cls(phase.scheduler, phase.lr, phase.epochs, max(1, steps_per_epoch), phase.warmup_epochs)

    def lr_at(self, step: int) -> float:
        if self.kind == "constant":
            return self.lr
        if self.kind == "plateau":
            return self.lr * self.plateau_scale
        if self.kind == "step":  # x0.1 every third of the phase
            return self.lr * 0.1 ** ((step // self.steps_per_epoch) // max(1, self.epochs // 3))
        total = max(1, self.epochs * self.steps_per_epoch)
        warmup = int(round(self.warmup_epochs * self.steps_per_epoch))
        if step < warmup:
            return self.lr * (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return self.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))

    def end_epoch(self, val_loss: float) -> None:
        if self.kind != "plateau":
            return
        if val_loss < self.plateau_best * (1 - PLATEAU_THRESHOLD):
            self.plateau_best, self.plateau_bad_epochs = val_loss, 0
        else:
            self.plateau_bad_epochs += 1
        if self.plateau_bad_epochs > PLATEAU_PATIENCE:
            self.plateau_scale *= PLATEAU_FACTOR
            self.plateau_bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {"plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best,
                "plateau_bad_epochs": self.plateau_bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad_epochs = int(state["plateau_bad_epochs"])


def set_learning_rates(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr`` times its ``lr_scale`` (the head's discriminative multiple)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class EpochSampler(torch.utils.data.Sampler[int]):
    """The order of an epoch's training samples as a function of (seed, epoch) alone: the head
    loop and the image phases see the same order, and a resumed run sees the order of a run never
    stopped without carrying a generator's state. With ``weights``, samples are drawn with
    replacement in proportion to them (balanced sampling)."""

    def __init__(self, num_samples: int, seed: int, weights: torch.Tensor | None = None):
        self.num_samples = num_samples
        self.seed = seed
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before each epoch
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        if self.weights is None:
            return torch.randperm(self.num_samples, generator=generator)
        return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)

    def __iter__(self) -> Any:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.num_samples


def class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse class frequency, 1.0 for balanced data: loss weights, and per-sample sampling
    weights when indexed by label (the sampler only needs them proportional)."""
    counts = torch.bincount(torch.tensor(targets), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))


def create_sampler(targets: list[int], num_classes: int, seed: int, class_balance: str) -> EpochSampler:
    weights = class_weights(targets, num_classes)[torch.tensor(targets)] if class_balance == "sample" else None
    return EpochSampler(len(targets), seed, weights)


def training_loss(label_smoothing: float, weights: torch.Tensor | None) -> nn.Module:
    """The objective. Validation loss is plain log loss instead, a measurement rather than an
    objective, so phases and runs trained with other smoothing or class weights compare on one scale."""
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)


def log_trainable(phase: str, model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of ``model``, once the phase has frozen what it freezes."""
    trainable, total = count_parameters(model)
    log.info("phase %s: trainable %s / %s parameters", phase, f"{trainable:,}", f"{total:,}")
    return trainable, total


def record_epoch(folder: RunFolder, record: EpochRecord, epochs: int, shown: bool = True) -> None:
    """history.csv's row and, where ``shown``, the console's line for one epoch (rank zero only)."""
    folder.write_epoch(record)
    if shown:
        epoch_log.info(format_epoch(record, epochs))


def format_epoch(record: EpochRecord, epochs: int | None) -> str:
    """``frozen     3/30  train loss 0.4127 acc 0.8934  val loss 0.3018 acc 0.9346  lr 9.71e-04    0.1 s``:
    the columns of every phase's lines line up."""

    def number(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"

    return (
        f"{record.phase:<8} {f'{record.epoch}/{epochs or chr(63)}':>7}  "
        f"train loss {number(record.train_loss)} acc {number(record.train_acc)}  "
        f"val loss {number(record.val_loss)} acc {number(record.val_acc)}  "
        f"lr {record.lr or 0:.2e}  {record.seconds or 0:>5.1f} s"
    )


def format_time_limit_stop(phase: str, epochs_done: int, planned: int, best_epoch: int) -> str:
    """The line after a phase that ``--time-limit`` ended before its last epoch."""
    return (f"{phase:<8} stopped at the time limit after {epochs_done} of {planned} epochs: another would end past "
            f"it (keeping the best epoch, {best_epoch})")


def format_stop(phase: str, patience: int, best_epoch: int) -> str:
    """The line after a phase that patience ended before its last epoch."""
    return (f"{phase:<8} stopped early: no better validation loss for {patience} epoch{'s' if patience > 1 else ''} "
            f"(best epoch {best_epoch})")
