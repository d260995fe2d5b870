"""The head on cached pooled features: a plain PyTorch loop.

One linear layer on tensors already in memory needs nothing of Lightning, whose per-step cost
was most of the phase. A checkpoint holds the head alone (the backbone is the pretrained one,
unchanged: saving it cost more than training the head) and what a resumed phase needs to
continue as if never stopped: optimizer, schedule, early-stopping state and the random
generators. Each epoch's state is kept in memory and written at most every
``SAVE_EVERY_SECONDS``, at the phase's end and on a stop (Ctrl-C, SIGTERM); a SIGKILL loses at
most those seconds, which the resume trains again to the same result. Every process of a
multi-process run trains the same head on the same features, rather than sharing the work: it
is milliseconds, splitting it would only add communication, and every process needs the head
to fine-tune from.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from transferkit.config import PhaseConfig
from transferkit.models.create import classifier_path, classify_pooled
from transferkit.models.freeze import freeze_backbone, parameter_groups
from transferkit.run.folder import RunFolder
from transferkit.run.records import EpochRecord, PhaseRecord
from transferkit.training.checkpoints import (
    collect_random_state,
    load_checkpoint,
    restore_random_state,
    save_checkpoint,
)
from transferkit.training.phase import EpochSampler, Schedule, log_trainable, record_epoch, set_learning_rates

log = logging.getLogger(__name__)

SAVE_EVERY_SECONDS = 5.0
"""How often the head's checkpoints may be written: its epochs take milliseconds, and two fsync'd
files an epoch made a disk busy with other work, not the training, the phase's cost."""


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
    resume_from: str | None,
    write: bool,
) -> PhaseRecord:
    """Train ``model``'s head on ``train`` for ``phase.epochs``, keep the epoch with the lowest
    validation loss as ``<name>-best.ckpt``, stop after ``phase.patience`` epochs without one.

    Only a ``write`` process (rank zero) writes checkpoints and history, and only it resumes
    from ``resume_from``, a checkpoint of this phase: another process trains from the start,
    which gives the same head in seconds without reading a file rank zero may be replacing.
    Returns with the best epoch's head in ``model``.
    """
    from timm.optim import create_optimizer_v2

    # The head trains beside its features, on the CPU, in milliseconds an epoch; a feature pass
    # on a GPU leaves the model there (eager forward functions move the module they run).
    model.cpu()
    freeze_backbone(model)
    trainable, total = log_trainable(name, model)
    head = model.get_classifier()

    def classify(features: torch.Tensor) -> torch.Tensor:
        return classify_pooled(model, features, drop_rate)

    optimizer = create_optimizer_v2(
        parameter_groups(model, phase.lr, phase.weight_decay),
        opt=phase.optimizer, lr=phase.lr, weight_decay=phase.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train) / batch_size)
    schedule = Schedule.for_phase(phase, steps_per_epoch)
    progress = _Progress()
    if resume_from and write:
        progress = _restore(resume_from, model, optimizer, schedule)
    best_head = None
    started = time.perf_counter()
    with _Saver(folder, name, enabled=write) as saver:
        for epoch in range(progress.epochs_done, phase.epochs):
            epoch_started = time.perf_counter()
            head.train()
            sampler.set_epoch(epoch)
            loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
            for step_in_epoch, indices in enumerate(sampler.order().split(batch_size)):
                lr = schedule.lr_at(epoch * steps_per_epoch + step_in_epoch)
                set_learning_rates(optimizer, lr)
                x, y = train.features[indices], train.targets[indices]
                logits = classify(x)
                batch_loss = loss(logits, y)
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
                loss_sum += batch_loss.detach() * len(y)
                correct += (logits.argmax(dim=1) == y).sum()
            head.eval()
            with torch.no_grad():
                val_logits = classify(val.features)
                val_loss = float(F.cross_entropy(val_logits, val.targets))
                val_acc = float((val_logits.argmax(dim=1) == val.targets).float().mean())
            schedule.end_epoch(val_loss)
            if write:
                record_epoch(folder, EpochRecord(
                    phase=name, epoch=epoch + 1, train_loss=round(float(loss_sum) / len(train), 6),
                    train_acc=round(float(correct) / len(train), 6), val_loss=round(val_loss, 6),
                    val_acc=round(val_acc, 6), lr=lr, seconds=round(time.perf_counter() - epoch_started, 3),
                ), phase.epochs)
            stop = progress.end_epoch(val_loss, val_acc, phase.patience)
            improved = progress.best_epoch == epoch + 1
            if improved:
                best_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
            if write:
                saver.update(_checkpoint(model, optimizer, schedule, progress), improved)
            if stop:
                break
    if best_head is None:  # resumed past its best epoch: rank zero wrote it before the stop
        best_head = _head_state(model, load_checkpoint(folder.checkpoint(name, "best")))
    head.load_state_dict(best_head)
    return PhaseRecord(
        done=True,
        best_checkpoint=str(folder.checkpoint(name, "best").relative_to(folder.root)),
        diverged=not math.isfinite(progress.best_val_loss),
        best_val_loss=round(progress.best_val_loss, 6) if math.isfinite(progress.best_val_loss) else None,
        best_val_acc=round(progress.best_val_acc, 6) if math.isfinite(progress.best_val_loss) else None,
        best_epoch=progress.best_epoch if math.isfinite(progress.best_val_loss) else None,
        epochs=progress.epochs_done,
        trainable_parameters=trainable,
        total_parameters=total,
        fit_seconds=round(time.perf_counter() - started, 3),
    )


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

    def update(self, state: dict[str, object], improved: bool) -> None:
        """``state`` after an epoch, the best one so far if ``improved``."""
        self.last = state
        if improved:
            self.best = state
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


@dataclass
class _Progress:
    """Epochs done and early stopping, as Lightning's ModelCheckpoint and EarlyStopping keep them:
    the first epoch is always a best one; a non-finite validation loss ends the phase."""

    epochs_done: int = 0
    best_val_loss: float = math.inf
    best_val_acc: float = 0.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0

    def end_epoch(self, val_loss: float, val_acc: float, patience: int) -> bool:
        """Record an epoch; whether the phase stops after it."""
        self.epochs_done += 1
        if self.best_epoch == 0 or val_loss < self.best_val_loss:
            self.best_epoch, self.best_val_acc = self.epochs_done, val_acc
            self.best_val_loss = val_loss if math.isfinite(val_loss) else math.inf
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return not math.isfinite(val_loss) or self.epochs_without_improvement >= patience


def _checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule, progress: _Progress
) -> dict[str, object]:
    prefix = f"model.{classifier_path(model)}."
    return {
        # Named as Lightning names the full model's weights, so one loader reads either kind.
        "state_dict": {prefix + k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()},
        # A copy: the optimizer's moments change in place, and this state may be written epochs later.
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "schedule": schedule.state_dict(),
        "progress": vars(progress).copy(),
        "rng_states": collect_random_state(),
    }


def _head_state(model: nn.Module, checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    prefix = f"model.{classifier_path(model)}."
    return {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def _restore(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule) -> _Progress:
    checkpoint = load_checkpoint(path)
    if "progress" not in checkpoint:
        log.warning("%s was written by an earlier transferkit; the phase starts again", path)
        return _Progress()
    model.get_classifier().load_state_dict(_head_state(model, checkpoint))
    optimizer.load_state_dict(checkpoint["optimizer"])
    schedule.load_state_dict(checkpoint["schedule"])
    restore_random_state(checkpoint["rng_states"])
    return _Progress(**checkpoint["progress"])
