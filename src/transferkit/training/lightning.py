"""Phases on images or cached activations, on Lightning: one module that trains a timm classifier
through its top (``WholeModel`` on images, ``AboveBoundary`` on cached activations), one callback,
``FineTuning``, that owns what differs between phases (as Lightning's ``BaseFinetuning``: which
blocks train, batch norm, parameter groups, each step's learning rate), and ``History``."""

from __future__ import annotations

import logging
import signal
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from transferkit.config import PhaseConfig
from transferkit.data.transforms import augment
from transferkit.errors import Interrupted
from transferkit.models.freeze import (
    backbone_blocks,
    freeze_backbone,
    parameter_groups,
    set_batchnorm_mode,
    unfreeze_top,
)
from transferkit.models.split import forward_head, forward_top
from transferkit.run.folder import RunFolder
from transferkit.run.records import PhaseRecord, legacy_phase_state
from transferkit.training.bookkeeping import PhaseBookkeeping
from transferkit.training.checkpoints import (
    SafeCheckpointIO,
    collect_random_state,
    load_checkpoint,
    model_state,
    restore_random_state,
)
from transferkit.training.mixing import Mixing
from transferkit.training.phase import Schedule, log_trainable, set_learning_rates
from transferkit.training.precision import DepthwiseInFloat32

log = logging.getLogger(__name__)


class FineTuning(L.Callback):
    """What trains in a phase on images and how fast. Before training, the backbone is frozen but
    for its top ``unfreeze`` blocks (0: the head alone; None: all). Before every step, the modules
    go back to training mode with batch norm under ``batchnorm`` (Lightning restores the modes it
    found around validation) and every parameter group gets the schedule's rate times its
    ``lr_scale``. The optimizer holds the trainable parameters only; the schedule travels in the
    checkpoint."""

    def __init__(self, name: str, phase: PhaseConfig, unfreeze: int | float | None, batchnorm: str):
        self.name = name
        self.phase = phase
        self.unfreeze = unfreeze
        self.batchnorm = batchnorm
        self.parameters = (0, 0)
        """(trainable, total), once frozen."""
        self.trained_blocks: int | None = None
        self.schedule = Schedule.for_phase(phase, steps_per_epoch=1)  # the loader's length is set on_train_start

    def freeze_before_training(self, model: nn.Module) -> None:
        if self.unfreeze == 0:
            freeze_backbone(model)
        else:
            self.trained_blocks = unfreeze_top(model, self.unfreeze)
            log.info("phase %s: %d of %d backbone blocks train", self.name, self.trained_blocks,
                     len(backbone_blocks(model)))
        self.parameters = log_trainable(self.name, model)

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.freeze_before_training(module.model)
        # CPU convolutions are faster with weights and inputs both channels-last; inputs alone gain nothing.
        module.model.to(memory_format=torch.channels_last)

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        # Saved models, exports and the next phase expect the default layout.
        module.model.to(memory_format=torch.contiguous_format)

    def create_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2

        phase = self.phase
        groups = parameter_groups(model, phase.lr, phase.weight_decay, phase.head_lr_multiplier)
        return create_optimizer_v2(groups, opt=phase.optimizer, lr=phase.lr, weight_decay=phase.weight_decay)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.schedule.steps_per_epoch = max(1, int(trainer.num_training_batches))

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_index: int) -> None:
        module.train()
        set_batchnorm_mode(module.model, self.batchnorm)
        set_learning_rates(trainer.optimizers[0], self.schedule.lr_at(trainer.global_step))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Validation has run by now; the checkpoint callbacks, which Lightning runs last, save after this.
        if "val_loss" in trainer.callback_metrics:
            self.schedule.end_epoch(float(trainer.callback_metrics["val_loss"]))

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)


class Top(Protocol):
    """What a phase's inputs go through to logits: the whole model, or its part above a boundary."""

    def __call__(self, inputs: torch.Tensor, training: bool) -> torch.Tensor: ...


class WholeModel:
    """Images to logits through the whole classifier (augmented by their loader)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        features = self.model.forward_features(images.contiguous(memory_format=torch.channels_last))
        return forward_head(self.model, features)


class AboveBoundary:
    """Cached activations at ``boundary`` (see ``models.split``) to logits through the layers above
    it, augmented in activation space as ``augment`` says while training."""

    def __init__(self, model: nn.Module, boundary: int, augment: str = "none"):
        self.model = model
        self.boundary = boundary
        self.augment = augment

    def __call__(self, activations: torch.Tensor, training: bool) -> torch.Tensor:
        if training:
            activations = augment(activations, self.augment)
        return forward_top(self.model, activations.float().contiguous(memory_format=torch.channels_last), self.boundary)


class ImageClassifier(L.LightningModule):
    """A timm classifier trained through ``top`` (the whole model on images by default);
    ``finetuning`` decides what trains. Not a submodule, ``top`` leaves checkpoints naming the
    weights ``model.*``."""

    def __init__(self, model: nn.Module, loss: nn.Module, finetuning: FineTuning, top: Top | None = None,
                 mixing: Mixing | None = None):
        super().__init__()
        self.model = model
        self.loss = loss
        self.finetuning = finetuning
        self.top = top if top is not None else WholeModel(model)
        self.mixing = mixing

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.top(inputs, training=False)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        inputs, targets = batch
        if stage == "train" and self.mixing is not None:
            inputs, soft_targets = self.mixing(inputs, targets)
            logits = self.top(inputs, training=True)
            loss = self.mixing.loss(logits, soft_targets)
        else:
            logits = self.top(inputs, training=stage == "train")
            loss = self.loss(logits, targets) if stage == "train" else F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        on_step = stage == "train"
        for name, value in (("loss", loss), ("acc", accuracy)):
            # The loggers get the epoch's history row from History, in the head loop's names.
            self.log(f"{stage}_{name}", value, prog_bar=True, on_step=on_step, on_epoch=True,
                     batch_size=len(targets), sync_dist=True, logger=False)
        return loss

    def on_train_batch_start(self, batch: Any, batch_index: int) -> None:
        # Here as well as in FineTuning: Lightning's lr_find swaps the trainer's callbacks for its own,
        # and its sweep should see the batch norm the phase trains with.
        set_batchnorm_mode(self.model, self.finetuning.batchnorm)

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_index: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.finetuning.create_optimizer(self.model)

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.finetuning]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = collect_random_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            restore_random_state(checkpoint["rng_states"])


class History(L.Callback):
    """The phase's ``PhaseBookkeeping`` fed each epoch's metrics; it also stops the phase after
    ``patience`` epochs without a lower validation loss. Its state travels in the checkpoint."""

    def __init__(self, bookkeeping: PhaseBookkeeping):
        self.bookkeeping = bookkeeping
        self.started = 0.0

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.bookkeeping.write = trainer.is_global_zero

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        group = trainer.optimizers[0].param_groups[0]
        stop = self.bookkeeping.end_epoch(
            train_loss=float(metrics["train_loss_epoch"]) if "train_loss_epoch" in metrics else None,
            train_acc=float(metrics["train_acc_epoch"]) if "train_acc_epoch" in metrics else None,
            val_loss=float(metrics["val_loss"]), val_acc=float(metrics["val_acc"]),
            lr=group["lr"] / group.get("lr_scale", 1.0), seconds=time.perf_counter() - self.started,
        )
        # Any process's stop stops all (a time limit reads its own clock); alone, one would wait forever.
        trainer.should_stop = trainer.should_stop or trainer.strategy.reduce_boolean_decision(stop, all=False)

    def on_load_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("callbacks", {}).get(self.state_key)
        if saved is None or "epochs_done" not in saved:
            rows = [r for r in self.bookkeeping.folder.read_history() if r.phase == self.bookkeeping.phase]
            self.bookkeeping.load_state_dict(legacy_phase_state(saved, rows, int(checkpoint["epoch"]) + 1))

    def state_dict(self) -> dict[str, Any]:
        return self.bookkeeping.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "epochs_done" in state_dict:  # else an earlier transferkit's, read in on_load_checkpoint
            self.bookkeeping.load_state_dict(state_dict)


def fit_with_lightning(
    module: ImageClassifier,
    train: DataLoader,
    val: DataLoader,
    *,
    folder: RunFolder,
    name: str,
    resume_from: Path | None,
    trainer_options: dict[str, Any],
    progress_bar: bool,
    loggers: Sequence[Any] = (),
    deadline: float | None = None,
) -> PhaseRecord:
    """Train ``module`` for its phase's epochs on Lightning (``trainer_options``: accelerator, devices,
    strategy, precision), keep the best epoch as ``<name>-best.ckpt``, end the phase where its
    ``PhaseBookkeeping`` says (patience, ``deadline``); ``History`` sends each epoch to ``loggers``."""
    phase = module.finetuning.phase
    checkpoint = ModelCheckpoint(
        dirpath=folder.writable(folder.checkpoints_dir), filename=RunFolder.checkpoint_stem(name, "best"),
        monitor="val_loss", mode="min", save_top_k=1, save_last=True, enable_version_counter=False,
    )
    checkpoint.CHECKPOINT_NAME_LAST = RunFolder.checkpoint_stem(name, "last")
    bookkeeping = PhaseBookkeeping(folder, name, phase.epochs, phase.patience, loggers=loggers, deadline=deadline)
    trainer = L.Trainer(
        max_epochs=phase.epochs, callbacks=[checkpoint, History(bookkeeping), DepthwiseInFloat32()],
        logger=list(loggers) or False, enable_model_summary=False, enable_progress_bar=progress_bar,
        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=folder.root, plugins=[SafeCheckpointIO()],
        **trainer_options,
    )
    started = time.perf_counter()
    _fit(trainer, module, train, val, resume_from)
    if not bookkeeping.diverged:
        # Every process, after Lightning's last barrier: the next phase starts from these weights.
        module.model.load_state_dict(model_state(load_checkpoint(checkpoint.best_model_path)))
    return bookkeeping.phase_record(
        str(Path(checkpoint.best_model_path).relative_to(folder.root)), module.finetuning.parameters,
        time.perf_counter() - started, trained_blocks=module.finetuning.trained_blocks,
        precision=str(trainer.precision),
    )


def _fit(trainer: L.Trainer, module: ImageClassifier, train: DataLoader, val: DataLoader,
         resume_from: Path | None) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        # An earlier transferkit's checkpoint holds EarlyStopping's state; History keeps it now.
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
        try:
            trainer.fit(module, train, val, ckpt_path=resume_from, weights_only=True)
        except SystemExit:
            # Lightning ends a fit stopped by Ctrl-C with sys.exit(1), and one stopped by SIGTERM
            # with a SystemExit without a code, which would exit 0 with no model and no word.
            raise Interrupted(signal.SIGTERM if trainer.received_sigterm else signal.SIGINT) from None
    if trainer.interrupted:
        raise Interrupted(signal.SIGTERM if trainer.received_sigterm else signal.SIGINT)
