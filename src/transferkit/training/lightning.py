"""Phases on images or cached activations, on Lightning: one module that trains a timm classifier whatever the phase,
and one callback, ``FineTuning``, that owns what differs between phases (in the style of
Lightning's ``BaseFinetuning``): which blocks train, the batch-norm policy, the optimizer's
parameter groups and each step's learning rate."""

from __future__ import annotations

import logging
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
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
from transferkit.run.records import EpochRecord, PhaseRecord
from transferkit.training.checkpoints import (
    SafeCheckpointIO,
    collect_random_state,
    load_checkpoint,
    model_state,
    restore_random_state,
)
from transferkit.training.phase import Schedule, log_trainable, record_epoch, set_learning_rates
from transferkit.training.precision import DepthwiseInFloat32

log = logging.getLogger(__name__)


class FineTuning(L.Callback):
    """What trains in a phase on images and how fast.

    Before training, the backbone is frozen but for its top ``unfreeze`` blocks (0: the head
    alone; None: all). Before every step, the modules go back to training mode with batch norm
    under ``batchnorm`` (Lightning restores the modes it found around validation) and every
    parameter group gets the schedule's rate times its ``lr_scale``. The optimizer holds the
    trainable parameters only. The schedule's state travels in the checkpoint.
    """

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
        # Convolutions on CPU run 1.6x faster forward and backward with weights and inputs both
        # channels-last (EfficientNet-Lite0's top three blocks, batch 32); inputs alone gain nothing.
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


class ImageClassifier(L.LightningModule):
    """A timm classifier trained on images, or on the cached activations at ``boundary`` (see
    ``activations``) with ``augment`` applied in activation space; ``finetuning`` decides what trains."""

    def __init__(
        self, model: nn.Module, loss: nn.Module, finetuning: FineTuning, boundary: int | None = None,
        augment: str = "none",
    ):
        super().__init__()
        self.model = model
        self.loss = loss
        self.finetuning = finetuning
        self.boundary = boundary
        self.augment = augment

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.boundary is None:
            features = self.model.forward_features(inputs.contiguous(memory_format=torch.channels_last))
            return forward_head(self.model, features)
        return forward_top(
            self.model, inputs.float().contiguous(memory_format=torch.channels_last), self.boundary
        )

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.loss(logits, targets) if stage == "train" else F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        on_step = stage == "train"
        for name, value in (("loss", loss), ("acc", accuracy)):
            self.log(f"{stage}_{name}", value, prog_bar=True, on_step=on_step, on_epoch=True,
                     batch_size=len(targets), sync_dist=True)
        return loss

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        inputs, targets = batch
        if self.boundary is not None:
            inputs = augment(inputs, self.augment)
        return self._step((inputs, targets), "train")

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
    """history.csv's row and the console's line for each epoch of ``phase``, and the epoch with
    the lowest validation loss so far (kept in the checkpoint, so a resumed phase knows it)."""

    def __init__(self, folder: RunFolder, phase: str):
        self.folder = folder
        self.phase = phase
        self.started = 0.0
        self.epochs = 0
        self.best: EpochRecord | None = None
        self.complete = True
        """False once resumed from a checkpoint without this state (an earlier transferkit wrote it)."""

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics

        def value(name: str) -> float | None:
            return round(float(metrics[name]), 6) if name in metrics else None

        group = trainer.optimizers[0].param_groups[0]
        record = EpochRecord(
            phase=self.phase, epoch=trainer.current_epoch + 1,
            train_loss=value("train_loss_epoch"), train_acc=value("train_acc_epoch"),
            val_loss=value("val_loss"), val_acc=value("val_acc"),
            lr=group["lr"] / group.get("lr_scale", 1.0), seconds=round(time.perf_counter() - self.started, 3),
        )
        self.epochs += 1
        if record.val_loss is not None and math.isfinite(record.val_loss):
            if self.best is None or record.val_loss < self.best.val_loss:  # type: ignore[operator]
                self.best = record
        if trainer.is_global_zero:
            record_epoch(self.folder, record, trainer.max_epochs or 0)

    def on_load_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.complete = self.state_key in checkpoint.get("callbacks", {})

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best": self.best.as_row() if self.best else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = state_dict["epochs"]
        best = state_dict["best"]
        self.best = EpochRecord.from_row({k: str(v) for k, v in best.items()}) if best else None


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
) -> PhaseRecord:
    """Train ``module`` for its phase's epochs on Lightning, keep the epoch with the lowest
    validation loss as ``<name>-best.ckpt``, stop after ``phase.patience`` epochs without one.
    ``trainer_options`` are Lightning's accelerator, devices, strategy and precision."""
    phase = module.finetuning.phase
    checkpoint = ModelCheckpoint(
        dirpath=folder.writable(folder.checkpoints_dir), filename=RunFolder.checkpoint_stem(name, "best"), monitor="val_loss",
        mode="min", save_top_k=1, save_last=True, enable_version_counter=False,
    )
    checkpoint.CHECKPOINT_NAME_LAST = RunFolder.checkpoint_stem(name, "last")
    history = History(folder, name)
    trainer = L.Trainer(
        max_epochs=phase.epochs,
        callbacks=[checkpoint, EarlyStopping(monitor="val_loss", mode="min", patience=phase.patience), history,
                   DepthwiseInFloat32()],
        logger=False, enable_model_summary=False, enable_progress_bar=progress_bar, num_sanity_val_steps=0,
        log_every_n_steps=1, default_root_dir=folder.root, plugins=[SafeCheckpointIO()], **trainer_options,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        try:
            trainer.fit(module, train, val, ckpt_path=resume_from, weights_only=True)
        except SystemExit:
            # Lightning ends a fit stopped by Ctrl-C with sys.exit(1), and one stopped by SIGTERM
            # with a SystemExit without a code, which would exit 0 with no model and no word.
            raise Interrupted(signal.SIGTERM if trainer.received_sigterm else signal.SIGINT) from None
    if trainer.interrupted:
        raise Interrupted(signal.SIGTERM if trainer.received_sigterm else signal.SIGINT)
    # Lightning scores a NaN validation loss as infinite; EarlyStopping ends the phase there.
    score = checkpoint.best_model_score
    diverged = score is None or not math.isfinite(float(score))
    best, epochs = history.best, history.epochs
    if not history.complete and trainer.is_global_zero:
        rows = [e for e in folder.read_history() if e.phase == name and e.val_loss is not None]
        finite = [e for e in rows if math.isfinite(e.val_loss)]  # type: ignore[arg-type]
        best, epochs = min(finite, key=lambda e: e.val_loss) if finite else None, len(rows)  # type: ignore[arg-type, return-value]
    if not diverged:
        # Every process, after Lightning's last barrier: the next phase starts from these weights.
        module.model.load_state_dict(model_state(load_checkpoint(checkpoint.best_model_path)))
    return PhaseRecord(
        done=True, best_checkpoint=str(Path(checkpoint.best_model_path).relative_to(folder.root)), diverged=diverged,
        best_val_loss=None if diverged or best is None else best.val_loss,
        best_val_acc=None if diverged or best is None else best.val_acc,
        best_epoch=None if diverged or best is None else best.epoch,
        epochs=epochs, trainable_parameters=module.finetuning.parameters[0],
        total_parameters=module.finetuning.parameters[1], trained_blocks=module.finetuning.trained_blocks,
        fit_seconds=round(time.perf_counter() - started, 3),
        precision=str(trainer.precision),
    )
