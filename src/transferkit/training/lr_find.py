"""The learning-rate finder (``--frozen-lr auto``, ``--finetune-lr auto``): Lightning's own.

A phase on Lightning is swept by ``Tuner.lr_find``; the head on cached features, which trains in
a plain loop, by the same sweep in that loop (Lightning's exponential steps, smoothing and
divergence stop). Both end in Lightning's ``_LRFinder``, so one rule suggests the rate (the
steepest fall of the smoothed loss per decade, see ``suggestion``) and one function draws the
curve. Every sweep leaves the model's weights as it found them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.tuner.lr_finder import _LRFinder
from torch import nn
from torch.utils.data import DataLoader

from transferkit.config import PhaseConfig
from transferkit.models.create import classify_pooled
from transferkit.models.freeze import freeze_backbone
from transferkit.training.checkpoints import SafeCheckpointIO
from transferkit.training.head_loop import LabelledFeatures, create_head_optimizer
from transferkit.training.lightning import ImageClassifier
from transferkit.training.phase import EpochSampler, set_learning_rates

log = logging.getLogger(__name__)

MIN_LR, MAX_LR, STEPS = 1e-8, 1.0, 100
"""Lightning's ``lr_find`` defaults: the swept range and its steps."""
SMOOTHING, DIVERGED = 0.98, 4.0
"""Lightning's running-average weight of the loss, and the multiple of the best loss that ends a sweep."""


def sweep_head(
    model: nn.Module, phase: PhaseConfig, train: LabelledFeatures, loss: nn.Module, sampler: EpochSampler,
    batch_size: int, drop_rate: float,
) -> _LRFinder:
    """Lightning's exponential sweep of the head's learning rate, on cached pooled features."""
    model.cpu()
    freeze_backbone(model)
    head = model.get_classifier()
    saved = copy.deepcopy(head.state_dict())
    optimizer = create_head_optimizer(model, phase)
    finder = _LRFinder("exponential", MIN_LR, MAX_LR, STEPS)
    rates, losses, average, best = [], [], 0.0, math.inf
    for step, indices in zip(range(STEPS), _batches(sampler, batch_size)):
        rate = MIN_LR * (MAX_LR / MIN_LR) ** (step / STEPS)
        set_learning_rates(optimizer, rate)
        head.train()
        batch_loss = loss(classify_pooled(model, train.features[indices], drop_rate), train.targets[indices])
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        # The loss over every training image, not the batch's: it costs a matrix product here, and
        # the suggestion (a gradient over the rate) reads batch-to-batch noise at small rates as a fall.
        head.eval()
        with torch.no_grad():
            step_loss = float(loss(classify_pooled(model, train.features, drop_rate), train.targets))
        average = SMOOTHING * average + (1 - SMOOTHING) * step_loss
        smoothed = average / (1 - SMOOTHING ** (step + 1))
        rates.append(rate)
        losses.append(smoothed)
        if step > 1 and smoothed > DIVERGED * best or not math.isfinite(smoothed):
            break
        best = min(best, smoothed)
    head.load_state_dict(saved)
    finder.results = {"lr": rates, "loss": losses}
    return finder


def _batches(sampler: EpochSampler, batch_size: int) -> Any:
    """Batches of row indices, epoch after epoch, in the sampler's order."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from sampler.order().split(batch_size)
        epoch += 1


def sweep_with_lightning(
    module: ImageClassifier, train: DataLoader, trainer_options: dict[str, Any], progress_bar: bool, scratch: Path
) -> _LRFinder:
    """``Tuner(trainer).lr_find`` over ``module``'s phase; Lightning puts the weights back after it
    from a checkpoint it writes in ``scratch`` (the run's checkpoints folder, never the working
    directory). Without ``progress_bar``, the sweep's own bar (which Lightning always draws) goes nowhere."""
    trainer = L.Trainer(
        max_epochs=STEPS, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, num_sanity_val_steps=0, plugins=[SafeCheckpointIO()], default_root_dir=scratch,
        **trainer_options,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*validation_step.*")
        quiet = contextlib.nullcontext() if progress_bar else contextlib.redirect_stderr(io.StringIO())
        with quiet:
            finder = Tuner(trainer).lr_find(
                module, train_dataloaders=train, min_lr=MIN_LR, max_lr=MAX_LR, num_training=STEPS, update_attr=False,
            )
    assert finder is not None  # lr_find returns None only on a process that is not rank zero of a fast_dev_run
    return finder


def suggestion(finder: _LRFinder, fallback: float, name: str) -> float:
    """The rate where the smoothed loss falls fastest per decade: Lightning's ``suggestion`` (its
    skips, its finite points) run over the rate's logarithm, which is fastai's ``steep``. Over the
    rate itself, as Lightning reads it, a sweep whose loss falls smoothly gives its first steps (a
    tiny run's head: 9e-8), since a step of 1e-9 divides any change. ``fallback``, with a
    warning, where the sweep gave too few finite points. Marks the rate's index for ``plot_sweep``."""
    decades = _LRFinder(finder.mode, finder.lr_min, finder.lr_max, finder.num_training)
    decades.results = {"lr": [math.log10(rate) for rate in finder.results["lr"]], "loss": finder.results["loss"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exponent = decades.suggestion()
    finder._optimal_idx = decades._optimal_idx
    if exponent is None or not math.isfinite(10**exponent):
        log.warning("--%s-lr auto: the sweep found no falling loss to read a rate from; using %g", name, fallback)
        return fallback
    return float(finder.results["lr"][decades._optimal_idx])


def plot_sweep(finder: _LRFinder, name: str, rate: float) -> Any:
    """The smoothed loss against the learning rate, ``suggestion``'s rate marked: Lightning's plot, titled."""
    from transferkit.reporting.figures import pyplot

    figure, axes = pyplot().subplots(figsize=(6, 4), constrained_layout=True)
    finder.plot(suggest=False, ax=axes)
    index = getattr(finder, "_optimal_idx", None)
    if index is not None:
        axes.plot(finder.results["lr"][index], finder.results["loss"][index], marker="o", markersize=10, color="red")
    axes.set_title(f"{name} phase: suggested learning rate {rate:.2e}")
    return figure


def write_sweep_plot(finder: _LRFinder, name: str, rate: float, path: Path) -> None:
    from transferkit._io import atomic_write
    from transferkit.reporting.figures import FIGURE_DPI, pyplot

    figure = plot_sweep(finder, name, rate)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=FIGURE_DPI, format="png"))
    pyplot().close(figure)


def write_sweep_table(finder: _LRFinder, path: Path) -> None:
    """The swept rates and their smoothed losses, one row each, as a CSV file."""
    from transferkit._io import write_text

    rows = [f"{rate!r},{loss!r}" for rate, loss in zip(finder.results["lr"], finder.results["loss"])]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "\n".join(["learning_rate,smoothed_loss", *rows]) + "\n")
