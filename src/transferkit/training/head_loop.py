"""The head on cached pooled features: a plain PyTorch loop, since one linear layer on tensors
in memory needs nothing of Lightning. A checkpoint holds the head alone (the backbone is the
pretrained one) and what a resumed phase needs to continue as if never stopped: optimizer,
schedule, bookkeeping and the random generators. Checkpoints are written at most every
``SAVE_EVERY_SECONDS``, at the phase's end and on a stop (Ctrl-C, SIGTERM). Every process of a
multi-process run trains the same head: it takes milliseconds, and every process fine-tunes from it.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from transferkit._io import stops_held
from transferkit.config import PhaseConfig
from transferkit.models.create import classifier_path, classify_pooled
from transferkit.models.freeze import freeze_backbone, parameter_groups
from transferkit.run.folder import RunFolder
from transferkit.run.records import PhaseRecord
from transferkit.training.bookkeeping import PhaseBookkeeping
from transferkit.training.checkpoints import (
    collect_random_state,
    load_checkpoint,
    restore_random_state,
    save_checkpoint,
)
from transferkit.training.phase import EpochSampler, Schedule, log_trainable, set_learning_rates

log = logging.getLogger(__name__)

SAVE_EVERY_SECONDS = 5.0
"""How often the head's checkpoints may be written: its epochs take milliseconds, two fsync'd files far longer."""


@dataclass
class LabelledFeatures:
    """Pooled features of one split and their labels."""

    features: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


def train_head(
    model: nn.Module,
    phase: PhaseConfig,
    train: LabelledFeatures,
    val: LabelledFeatures,
    *,
    loss: nn.Module,
    sampler: EpochSampler,
    batch_size: int,
    drop_rate: float,
    folder: RunFolder,
    name: str,
    resume_from: str | os.PathLike[str] | None,
    write: bool, loggers: Sequence[Any] = (), deadline: float | None = None,
) -> PhaseRecord:
    """Train ``model``'s head on ``train`` for ``phase.epochs``, keep the epoch with the lowest
    validation loss as ``<name>-best.ckpt``, stop after ``phase.patience`` epochs without one, or
    before one that would end past ``deadline`` (the first always runs); each goes to ``loggers``.

    Only a ``write`` process (rank zero) writes checkpoints and history, and only it resumes from
    ``resume_from``: another process trains from the start, which gives the same head in seconds
    without reading a file rank zero may be replacing. Returns with the best epoch's head in ``model``.
    """
    # The head trains beside its features, on the CPU; a feature pass on a GPU leaves the model there.
    model.cpu()
    freeze_backbone(model)
    parameters = log_trainable(name, model)
    head = model.get_classifier()
    optimizer = create_head_optimizer(model, phase)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    schedule = Schedule.for_phase(phase, steps_per_epoch)
    bookkeeping = PhaseBookkeeping(folder, name, phase.epochs, phase.patience, write, loggers, deadline)
    if resume_from and write:
        _restore(resume_from, model, optimizer, schedule, bookkeeping)
    best_head = None
    started = time.perf_counter()
    with _Saver(folder, name, enabled=write) as saver:
        for epoch in range(bookkeeping.epochs_done, phase.epochs):
            epoch_started = time.perf_counter()
            sampler.set_epoch(epoch)
            batches = sampler.order().split(batch_size)
            train_loss, train_acc, lr = _train_epoch(model, drop_rate, optimizer, schedule, epoch * steps_per_epoch,
                                                     loss, train, batches)
            val_loss, val_acc = _validate(model, drop_rate, val)
            schedule.end_epoch(val_loss)
            stop = bookkeeping.record(train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                                      val_acc=val_acc, lr=lr, seconds=time.perf_counter() - epoch_started)
            if bookkeeping.improved:
                best_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
            _keep_and_publish(saver if write else None, model, optimizer, schedule, bookkeeping)
            saver.save_if_due()  # nothing is kept where another process writes
            if stop:
                break
    if best_head is None:  # resumed past its best epoch: rank zero wrote it before the stop
        best_head = _head_state(model, load_checkpoint(folder.checkpoint(name, "best")))
    head.load_state_dict(best_head)
    best_checkpoint = str(folder.checkpoint(name, "best").relative_to(folder.root))
    return bookkeeping.phase_record(best_checkpoint, parameters, time.perf_counter() - started)


def _keep_and_publish(
    saver: _Saver | None, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
    bookkeeping: PhaseBookkeeping,
) -> None:
    """The epoch held for the next checkpoint and its history row and logger metrics written, both
    or neither: a stop between them would save an epoch history.csv and the loggers never get (a
    resume starts after it), or show one that trains again."""
    state = _checkpoint(model, optimizer, schedule, bookkeeping) if saver is not None else None
    with stops_held():
        if saver is not None and state is not None:
            saver.keep(state, bookkeeping.improved)
        bookkeeping.publish()


def create_head_optimizer(model: nn.Module, phase: PhaseConfig) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    groups = parameter_groups(model, phase.lr, phase.weight_decay)
    return create_optimizer_v2(groups, opt=phase.optimizer, lr=phase.lr, weight_decay=phase.weight_decay)


def _train_epoch(
    model: nn.Module, drop_rate: float, optimizer: torch.optim.Optimizer, schedule: Schedule, first_step: int,
    loss: nn.Module, train: LabelledFeatures, batches: tuple[torch.Tensor, ...],
) -> tuple[float, float, float]:
    """One pass over ``batches`` of ``train``'s rows, from step ``first_step`` of the phase: the
    mean training loss, the accuracy and the last step's learning rate."""
    model.get_classifier().train()
    loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
    lr = schedule.lr_at(first_step)
    for step, indices in enumerate(batches, start=first_step):
        lr = schedule.lr_at(step)
        set_learning_rates(optimizer, lr)
        x, y = train.features[indices], train.targets[indices]
        logits = classify_pooled(model, x, drop_rate)
        batch_loss = loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        loss_sum += batch_loss.detach() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
    return float(loss_sum) / len(train), float(correct) / len(train), lr


def _validate(model: nn.Module, drop_rate: float, val: LabelledFeatures) -> tuple[float, float]:
    model.get_classifier().eval()
    with torch.no_grad():
        logits = classify_pooled(model, val.features, drop_rate)
        loss = float(F.cross_entropy(logits, val.targets))
        return loss, float((logits.argmax(dim=1) == val.targets).float().mean())


class _Saver:
    """The phase's ``last`` and ``best`` checkpoints, held in memory and written at most every
    ``SAVE_EVERY_SECONDS``, when the phase ends and when it is stopped (KeyboardInterrupt, which
    SIGTERM raises too); any other error leaves the ones written before it."""

    def __init__(self, folder: RunFolder, name: str, enabled: bool):
        self.folder, self.name, self.enabled = folder, name, enabled
        self.last: dict[str, object] | None = None
        self.best: dict[str, object] | None = None
        self.saved_at = time.monotonic()
        if enabled:
            folder.writable(folder.checkpoints_dir).mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> _Saver:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None or issubclass(kind, KeyboardInterrupt):
            self.save()

    def keep(self, state: dict[str, object], improved: bool) -> None:
        """``state`` after an epoch, the best one so far if ``improved``, held for the next save."""
        self.last = state
        if improved:
            self.best = state

    def save_if_due(self) -> None:
        if time.monotonic() - self.saved_at >= SAVE_EVERY_SECONDS:
            self.save()

    def save(self) -> None:
        # Best first: a last checkpoint on disk must never name a best epoch whose file is not there.
        for kind in ("best", "last"):
            state = getattr(self, kind)
            if state is not None:
                save_checkpoint(state, self.folder.checkpoint(self.name, kind))
                setattr(self, kind, None)
        self.saved_at = time.monotonic()


def _checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule, bookkeeping: PhaseBookkeeping
) -> dict[str, object]:
    prefix = f"model.{classifier_path(model)}."
    return {
        # Named as Lightning names the full model's weights, so one loader reads either kind.
        "state_dict": {prefix + k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()},
        # A copy: the optimizer's moments change in place, and this state may be written epochs later.
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "schedule": schedule.state_dict(),
        "progress": bookkeeping.state_dict(),
        "rng_states": collect_random_state(),
    }


def _head_state(model: nn.Module, checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    prefix = f"model.{classifier_path(model)}."
    return {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def _restore(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
    bookkeeping: PhaseBookkeeping,
) -> None:
    checkpoint = load_checkpoint(path)
    if "progress" not in checkpoint:
        log.warning("%s was written by an earlier transferkit; the phase starts again", path)
        return
    model.get_classifier().load_state_dict(_head_state(model, checkpoint))
    optimizer.load_state_dict(checkpoint["optimizer"])
    schedule.load_state_dict(checkpoint["schedule"])
    restore_random_state(checkpoint["rng_states"])
    bookkeeping.load_state_dict(checkpoint["progress"])
