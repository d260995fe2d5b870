"""What a fit does, decided once from the config, the model and the data before any phase trains."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from transferkit.cache.activations import finetune_boundary, views_read
from transferkit.config import (
    MANY_BLOCKS,
    MANY_BLOCKS_FROM,
    PhaseConfig,
    TrainConfig,
    parse_unfreeze,
    unfreeze_is_auto,
)
from transferkit.data.folders import DatasetIndex
from transferkit.training.presets import parse_duration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitPlan:
    """The two phases and how each trains."""

    frozen: PhaseConfig
    """The head phase (no epochs: skipped)."""
    finetune: PhaseConfig
    """Fine-tuning of the top blocks with the head (no epochs: skipped)."""
    unfreeze: int | float | None
    """Backbone blocks fine-tuning trains (``--finetune-unfreeze``, ``auto`` resolved); None: all."""
    unfreeze_is_auto: bool
    boundary: int | None
    """Where fine-tuning's cached activations split the backbone; None: it trains on images."""
    views: int
    """Augmented views of the training images' activations fine-tuning reads (``--finetune-views``)."""
    head_on_features: bool
    """The head phase trains on cached pooled features in the plain loop, not on images."""
    batchnorm: str
    seed: int
    batch_size: int
    drop_rate: float
    num_workers: int
    trainer_options: dict[str, Any]
    """Lightning's accelerator, devices, strategy and precision."""
    progress_bar: bool
    mixup: float = 0.0
    """Fine-tuning's mixup alpha (``--finetune-mixup``; 0: none)."""
    cutmix: float = 0.0
    """Fine-tuning's CutMix alpha on images (``--finetune-cutmix``; 0: none)."""
    label_smoothing: float = 0.0
    deadline: float | None = None
    """``--time-limit`` as a ``time.perf_counter()`` time: no epoch starts that would end past it."""

    @classmethod
    def decide(
        cls, config: TrainConfig, model: nn.Module, preprocessing: dict[str, Any], index: DatasetIndex,
        trainer_options: dict[str, Any], started: float | None = None,
    ) -> FitPlan:
        """The plan for ``model`` on ``index`` as first split: the unfrozen blocks and the boundary
        hardly move when groups cut the split again, and the pass that caches the activations
        also gives every image's pooled features for that cut. ``--time-limit`` runs from
        ``started`` (``time.perf_counter()``)."""
        unfreeze = parse_unfreeze(config.finetune.unfreeze, len(index.targets("train")))
        fine_tunes = config.finetune.epochs > 0
        boundary = finetune_boundary(model, unfreeze, config, preprocessing, index) if fine_tunes else None
        return cls(
            frozen=config.frozen, finetune=config.finetune, unfreeze=unfreeze,
            unfreeze_is_auto=fine_tunes and unfreeze_is_auto(config.finetune.unfreeze), boundary=boundary,
            views=views_read(config.finetune_views, config.finetune.epochs) if boundary is not None else 0,
            head_on_features=config.frozen.epochs > 0 and config.feature_cache and config.frozen.augment == "none",
            batchnorm=config.batchnorm, seed=config.seed, batch_size=config.data.batch_size,
            drop_rate=config.model.drop_rate, num_workers=config.data.resolved_num_workers(),
            trainer_options=trainer_options, progress_bar=config.progress, mixup=config.finetune_mixup,
            cutmix=config.finetune_cutmix, label_smoothing=config.label_smoothing,
            deadline=started + parse_duration(config.time_limit) if config.time_limit and started is not None else None,
        )

    def log_unfreeze(self, training_images: int) -> None:
        if self.unfreeze_is_auto:
            log.info("--finetune-unfreeze auto: %d blocks for %s training images (%d from %s)",
                     self.unfreeze, f"{training_images:,}", MANY_BLOCKS, f"{MANY_BLOCKS_FROM:,}")
