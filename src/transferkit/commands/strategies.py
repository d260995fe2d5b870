"""The strategies ``compare`` trains: each one a function from the shared config to its run's config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from transferkit.config import TrainConfig

STRATEGIES = {
    "scratch": "no pretrained weights: every layer starts random and trains (the baseline transfer is measured against)",
    "frozen": "ImageNet backbone frozen, a new linear head",
    "frozen-dense": "ImageNet backbone frozen, a head with a hidden dense layer",
    "fine-tune": "head on frozen features, then the top blocks unfrozen",
    "full": "ImageNet weights as the start, every layer trained at once",
}


# Learning rates of the phases that train the backbone: random weights need a larger step than
# pretrained ones, which a large step would wreck.
SCRATCH_LR = 1e-3


PRETRAINED_LR = 1e-4


@dataclass(frozen=True)
class StrategySettings:
    """What a strategy sets besides its own choices: the same budget for every run, and the
    knobs of the strategies that have one."""

    epochs: int
    patience: int
    hidden_size: int
    unfreeze: str


Strategy = Callable[[TrainConfig, StrategySettings], TrainConfig]


def _head_only(config: TrainConfig, settings: StrategySettings) -> TrainConfig:
    return replace(
        config, frozen=replace(config.frozen, epochs=settings.epochs, patience=settings.patience),
        finetune=replace(config.finetune, epochs=0),
    )


def _through_backbone(config: TrainConfig, settings: StrategySettings, lr: float) -> TrainConfig:
    # Every block trains, so no layer below them stays fixed to cache activations (or views) at.
    return replace(
        config, frozen=replace(config.frozen, epochs=0), finetune_on="images", finetune_views=0,
        finetune=replace(config.finetune, epochs=settings.epochs, patience=settings.patience, unfreeze="all", lr=lr),
    )


def scratch(config: TrainConfig, settings: StrategySettings) -> TrainConfig:
    return replace(
        _through_backbone(config, settings, SCRATCH_LR), model=replace(config.model, weights="none"), batchnorm="train"
    )


def frozen(config: TrainConfig, settings: StrategySettings) -> TrainConfig:
    return _head_only(config, settings)


def frozen_dense(config: TrainConfig, settings: StrategySettings) -> TrainConfig:
    return replace(_head_only(config, settings), model=replace(config.model, hidden_size=settings.hidden_size))


def fine_tune(config: TrainConfig, settings: StrategySettings) -> TrainConfig:
    return replace(
        config, frozen=replace(config.frozen, epochs=settings.epochs, patience=settings.patience),
        finetune=replace(
            config.finetune, epochs=settings.epochs, patience=settings.patience, unfreeze=settings.unfreeze,
            lr=PRETRAINED_LR,
        ),
    )


def full(config: TrainConfig, settings: StrategySettings) -> TrainConfig:
    return _through_backbone(config, settings, PRETRAINED_LR)


STRATEGY_FUNCTIONS: dict[str, Strategy] = {
    "scratch": scratch, "frozen": frozen, "frozen-dense": frozen_dense, "fine-tune": fine_tune, "full": full,
}
"""Each strategy as a function from the shared config to its run's config, in ``STRATEGIES``' order."""
