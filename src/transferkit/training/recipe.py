"""Two-phase transfer learning, in the spirit of fastai's ``fine_tune``: the head on the frozen
backbone, then the top blocks with it at a lower rate. Each phase keeps its epoch with the lowest
validation loss; the model ends with the best usable weights. ``FitPlan`` says how each phase
trains: the head on cached pooled features (a plain loop) or on images, fine-tuning on the cached
activations below the unfrozen blocks or on images (both on Lightning)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.tuner.lr_finder import _LRFinder
from torch import nn
from torch.utils.data import DataLoader, Subset

from transferkit.cache.activations import ViewDataset, training_loader
from transferkit.cache.shards import CachedRows
from transferkit.config import PhaseConfig, default_finetune_phase, default_frozen_phase, lr_is_auto
from transferkit.data.folders import DatasetIndex
from transferkit.data.loaders import image_loader
from transferkit.run.records import PhaseRecord
from transferkit.training.head_loop import LabelledFeatures, train_head
from transferkit.training.lightning import AboveBoundary, FineTuning, ImageClassifier, fit_with_lightning
from transferkit.training.lr_find import (
    MIN_LR,
    suggestion,
    sweep_head,
    sweep_with_lightning,
    write_sweep_plot,
)
from transferkit.training.mixing import create_mixing
from transferkit.training.phase import EpochSampler, epoch_log
from transferkit.training.plan import FitPlan
from transferkit.training.progress import PhaseProgress

log = logging.getLogger(__name__)


@dataclass
class FitInputs:
    """What the phases train on."""

    index: DatasetIndex
    preprocessing: dict[str, Any]
    loss: nn.Module
    sampler: EpochSampler
    """The order of each epoch's training samples, the same in every phase."""
    features: dict[str, torch.Tensor]
    """Each split's pooled features, where the head trains on them."""
    activations: dict[str, CachedRows]
    """Each split's activations at the plan's boundary, where fine-tuning trains on them."""
    views: list[CachedRows]
    """Augmented views of the training split's activations."""
    val_rows: np.ndarray
    """The validation rows with no near-copy in train (``clean_val_rows``): early stopping and the
    best epoch read only these."""

    def labelled(self, split: str) -> LabelledFeatures:
        features, targets = self.features[split], torch.tensor(self.index.targets(split))
        if split == "val":
            chosen = torch.from_numpy(self.val_rows)
            return LabelledFeatures(features[chosen], targets[chosen])
        return LabelledFeatures(features, targets)


PhaseFit = Callable[[nn.Module, FitPlan, FitInputs, PhaseProgress, Path | None], PhaseRecord]
"""A phase's training: the model, the plan, the inputs, the run's phases, the checkpoint it resumes from."""


def fine_tune(model: nn.Module, plan: FitPlan, inputs: FitInputs, progress: PhaseProgress) -> None:
    """Train the head, then fine-tune, each phase unless an earlier invocation finished it."""
    if plan.frozen.epochs > 0:
        run_phase("frozen", head_phase, model, plan, inputs, progress)
    if plan.finetune.epochs > 0:
        progress.backbone_pretrained = False  # a head-only checkpoint loads under the pretrained backbone
        run_phase("finetune", finetune_phase, model, plan, inputs, progress)


def run_phase(
    name: str, fit: PhaseFit, model: nn.Module, plan: FitPlan, inputs: FitInputs, progress: PhaseProgress
) -> None:
    """Train phase ``name`` with ``fit``, from its last checkpoint where it was interrupted, unless
    an earlier invocation finished it; either way ``model`` ends with the best usable weights so far."""
    if progress.finished(name):
        progress.load_last_usable(model)
        log.info("phase %s already finished; reusing its best checkpoint", name)
        return
    phase: PhaseConfig = getattr(plan, name)
    if lr_is_auto(phase.lr):
        phase = resolve_auto_lr(name, model, plan, inputs, progress)
        plan = dataclasses.replace(plan, **{name: phase})
    # Seeded again, so that a phase draws the same shuffles, augmentations and dropout masks
    # whether the phase before it ran in this process or in an earlier one.
    L.seed_everything(plan.seed, workers=True, verbose=False)
    record = fit(model, plan, inputs, progress, progress.resume_from(name))
    progress.record(name, record, f"--{name}-lr", phase.lr)
    if record.diverged:  # a fit leaves its best weights in the model; these are not usable
        progress.load_last_usable(model)


def head_phase(
    model: nn.Module, plan: FitPlan, inputs: FitInputs, progress: PhaseProgress, resume_from: Path | None
) -> PhaseRecord:
    """The head alone on the frozen backbone: on cached pooled features in a plain loop, else on images."""
    if not plan.head_on_features:
        return _fit_lightning("frozen", model, plan, inputs, progress, resume_from)
    return train_head(
        model, plan.frozen, inputs.labelled("train"), inputs.labelled("val"), loss=inputs.loss,
        sampler=inputs.sampler, batch_size=plan.batch_size, drop_rate=plan.drop_rate, folder=progress.folder,
        name="frozen", resume_from=resume_from, write=progress.write, loggers=progress.loggers, deadline=plan.deadline,
    )


def finetune_phase(
    model: nn.Module, plan: FitPlan, inputs: FitInputs, progress: PhaseProgress, resume_from: Path | None
) -> PhaseRecord:
    """The top ``plan.unfreeze`` blocks with the head: on their cached input activations at
    ``plan.boundary`` (one view an epoch in turn), else on images."""
    return _fit_lightning("finetune", model, plan, inputs, progress, resume_from)


def resolve_auto_lr(
    name: str, model: nn.Module, plan: FitPlan, inputs: FitInputs, progress: PhaseProgress
) -> PhaseConfig:
    """Phase ``name`` with its ``auto`` learning rate swept and chosen (``training.lr_find``), the
    sweep's plot in the run's figures and the rate written into its config.yaml."""
    finder = sweep_phase(name, model, plan, inputs, progress.folder.writable(progress.folder.checkpoints_dir))
    rate = suggested_rate(finder, name)
    if progress.write:
        folder = progress.folder
        path = folder.writable(folder.figures_dir) / f"lr-find-{name}.png"
        write_sweep_plot(finder, name, rate, path)
        source, config = folder.read_record()
        found = dataclasses.replace(getattr(config, name), lr=rate)
        folder.write_config(source, dataclasses.replace(config, **{name: found}))
        epoch_log.info("%s: learning rate %.2e found by the lr finder (%d rates swept from %.0e; plot: %s)",
                       name, rate, len(finder.results["lr"]), finder.lr_min, path)
    return dataclasses.replace(getattr(plan, name), lr=rate)


def sweep_phase(name: str, model: nn.Module, plan: FitPlan, inputs: FitInputs, scratch: Path) -> _LRFinder:
    """The learning-rate sweep of phase ``name`` as it would train now: the head's on its cached
    features (``sweep_head``), else Lightning's (its checkpoint kept in ``scratch``). The model's
    weights are as they were after it."""
    L.seed_everything(plan.seed, workers=True, verbose=False)  # the same sweep in every run
    phase: PhaseConfig = dataclasses.replace(getattr(plan, name), lr=MIN_LR)  # where the sweep starts
    plan = dataclasses.replace(plan, **{name: phase})
    if name == "frozen" and plan.head_on_features:
        return sweep_head(model, phase, inputs.labelled("train"), inputs.loss, inputs.sampler, plan.batch_size,
                          plan.drop_rate)
    module, train, _ = _lightning_inputs(name, model, plan, inputs)
    return sweep_with_lightning(module, train, plan.trainer_options, plan.progress_bar, scratch)


def suggested_rate(finder: _LRFinder, name: str) -> float:
    """The sweep's suggestion (``lr_find.suggestion``), else phase ``name``'s default rate."""
    fallback = (default_frozen_phase() if name == "frozen" else default_finetune_phase()).lr
    return suggestion(finder, fallback, name)


def _fit_lightning(
    name: str, model: nn.Module, plan: FitPlan, inputs: FitInputs, progress: PhaseProgress, resume_from: Path | None
) -> PhaseRecord:
    module, train, val = _lightning_inputs(name, model, plan, inputs)
    return fit_with_lightning(
        module, train, val, folder=progress.folder, name=name, resume_from=resume_from,
        trainer_options=plan.trainer_options, progress_bar=plan.progress_bar, loggers=progress.loggers,
        deadline=plan.deadline,
    )


def _lightning_inputs(
    name: str, model: nn.Module, plan: FitPlan, inputs: FitInputs
) -> tuple[ImageClassifier, DataLoader, DataLoader]:
    """Phase ``name`` on Lightning: the module and its training and validation batches, on the
    cached activations at ``plan.boundary`` (fine-tuning, one view an epoch in turn) or on images."""
    phase: PhaseConfig = getattr(plan, name)
    unfreeze = plan.unfreeze if name == "finetune" else 0
    finetuning = FineTuning(name, phase, unfreeze, plan.batchnorm)
    classes = len(inputs.index.classes)
    if name == "finetune" and plan.boundary is not None:
        targets = inputs.index.targets("train")
        train = training_loader([inputs.activations["train"], *inputs.views], targets, inputs.sampler, plan.batch_size)
        val = Subset(ViewDataset([inputs.activations["val"]], torch.tensor(inputs.index.targets("val"))),
                     inputs.val_rows.tolist())
        top = AboveBoundary(model, plan.boundary, phase.augment)
        mixing = create_mixing(plan.mixup, plan.cutmix, plan.label_smoothing, classes, on_images=False)
        return ImageClassifier(model, inputs.loss, finetuning, top, mixing), train, DataLoader(val, plan.batch_size)
    splits, preprocessing = inputs.index.splits, inputs.preprocessing
    train = image_loader(splits["train"], preprocessing, plan.batch_size, plan.num_workers, augment=phase.augment,
                         sampler=inputs.sampler)
    val_items = [splits["val"][row] for row in inputs.val_rows]
    val = image_loader(val_items, preprocessing, plan.batch_size, plan.num_workers)
    mixing = create_mixing(plan.mixup, plan.cutmix, plan.label_smoothing, classes, on_images=True) \
        if name == "finetune" else None
    return ImageClassifier(model, inputs.loss, finetuning, mixing=mixing), train, val
