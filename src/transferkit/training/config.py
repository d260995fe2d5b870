"""The options of one training phase (``--frozen-*``, ``--finetune-*``) and their defaults, and
the ``--logger`` names; ``config`` holds the two phases with the other sections."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transferkit.data.config import help_text
from transferkit.errors import close_matches, non_finite_problems

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
SCHEDULERS = ("cosine", "step", "plateau", "constant")
AUGMENTATIONS = ("none", "light", "strong")
# --finetune-unfreeze auto: six blocks paid only from a few thousand training images, at twice the
# time of three (benchmarks/RESULTS.md, "Measurements behind defaults").
FEW_BLOCKS, MANY_BLOCKS, MANY_BLOCKS_FROM = 3, 6, 4_000
MAX_LR = 1e30
"""Beyond it an optimizer's step overflows float32 and fails mid-phase; below it train reports a divergence."""


@dataclass
class PhaseConfig:
    epochs: int = field(default=0, metadata=help_text("epochs (0 skips the phase)"))
    lr: float | str = field(default=1e-3, metadata=help_text(
        "peak learning rate, or auto: Lightning's learning-rate finder sweeps the phase first and picks it "
        "(the sweep's plot in RUN/figures/lr-find-<phase>.png, the rate in config.yaml)"))
    optimizer: str = field(default="adamw", metadata=help_text(f"one of {', '.join(OPTIMIZERS)}"))
    weight_decay: float = field(default=1e-2, metadata=help_text("decoupled weight decay (not on norms and biases)"))
    scheduler: str = field(
        default="cosine",
        metadata=help_text("cosine (with warm-up), step (x0.1 every third of the phase), plateau, constant"),
    )
    warmup_epochs: float = field(default=0.0, metadata=help_text("linear warm-up length, in epochs"))
    augment: str = field(default="none", metadata=help_text(f"augmentation: {', '.join(AUGMENTATIONS)}"))
    patience: int = field(
        default=3, metadata=help_text("stop after this many epochs without a lower validation loss")
    )
    unfreeze: str = field(
        default="all",
        metadata=help_text(
            "backbone blocks to train: N top blocks, a fraction like 0.3, 'all', or 'auto' "
            f"({FEW_BLOCKS}, {MANY_BLOCKS} from {MANY_BLOCKS_FROM:,} training images)"
        ),
    )
    head_lr_multiplier: float = field(
        default=1.0,
        metadata=help_text("the head's learning rate as a multiple of lr while backbone blocks train with it"),
    )

    def problems(self, flag_prefix: str) -> list[str]:
        p = flag_prefix
        found = non_finite_problems(self, f"{p}-")
        if self.epochs < 0:
            found.append(f"--{p}-epochs must be 0 or more, got {self.epochs}")
        if isinstance(self.lr, str) and not lr_is_auto(self.lr) or isinstance(self.lr, bool):
            found.append(f"--{p}-lr must be a number or auto, got {self.lr!r}")
        elif not lr_is_auto(self.lr) and math.isfinite(self.lr) and not 0 < self.lr <= MAX_LR:
            found.append(f"--{p}-lr must be above 0 and at most {MAX_LR:g}, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            found.append(f"--{p}-optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            found.append(f"--{p}-scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.augment not in AUGMENTATIONS:
            found.append(f"--{p}-augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if math.isfinite(self.weight_decay) and self.weight_decay < 0:
            found.append(f"--{p}-weight-decay must be 0 or more, got {self.weight_decay}")
        if math.isfinite(self.warmup_epochs) and self.warmup_epochs < 0:
            found.append(f"--{p}-warmup-epochs must be 0 or more, got {self.warmup_epochs}")
        if math.isfinite(self.head_lr_multiplier) and self.head_lr_multiplier <= 0:
            found.append(f"--{p}-head-lr-multiplier must be above 0, got {self.head_lr_multiplier}")
        if self.patience < 1:
            found.append(f"--{p}-patience must be at least 1, got {self.patience}")
        try:
            parse_unfreeze(self.unfreeze)
        except ValueError:
            found.append(
                f"--{p}-unfreeze must be a block count (3), a fraction (0.3), 'all' or 'auto', got {self.unfreeze!r}"
            )
        return found


INSTALL_LOGGER = {
    "csv": "",
    "tensorboard": "pip install 'transferkit[tensorboard]'",
    "mlflow": "pip install 'transferkit[mlflow]'",
    "wandb": "pip install wandb",
}
"""Every ``--logger``, with the command that installs what it needs (csv needs nothing more)."""


def parse_loggers(text: str | None) -> list[str]:
    """``"tensorboard,mlflow"`` -> ``["tensorboard", "mlflow"]``; ``none`` or empty -> none."""
    names = [part.strip().lower() for part in str(text or "").split(",") if part.strip()]
    return [] if names == ["none"] else list(dict.fromkeys(names))


def logger_problems(text: str | None, mlflow_uri: str | None) -> list[str]:
    names = list(INSTALL_LOGGER)
    found = [f"--logger {name!r} is not one of none, {', '.join(names)}.{close_matches(name, names)}"
             for name in parse_loggers(text) if name not in names]
    if mlflow_uri and "mlflow" not in parse_loggers(text):
        found.append(f"--mlflow-uri {mlflow_uri} is for --logger mlflow, which is not chosen; add it to --logger")
    return found


def lr_is_auto(lr: float | str) -> bool:
    return isinstance(lr, str) and lr.strip().lower() == "auto"


def unfreeze_is_auto(spec: str) -> bool:
    return str(spec).strip().lower() == "auto"


def parse_unfreeze(spec: str, train_images: int | None = None) -> int | float | None:
    """'all' -> None, '3' -> 3 blocks, '0.3' -> 30% of the blocks, 'auto' -> by the training
    set's size (``train_images``; unknown counts as small)."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return MANY_BLOCKS if train_images is not None and train_images >= MANY_BLOCKS_FROM else FEW_BLOCKS
    if spec == "all":
        return None
    if spec.isdigit():
        return int(spec)
    fraction = float(spec)
    if not 0 < fraction <= 1:
        raise ValueError(spec)
    return fraction


def default_frozen_phase() -> PhaseConfig:
    # The head trains on cached features, so many cheap epochs cost seconds.
    return PhaseConfig(
        epochs=30, lr=1e-3, weight_decay=1e-2, augment="none", patience=5, unfreeze="0", warmup_epochs=1.0
    )


def default_finetune_phase() -> PhaseConfig:
    # Four epochs beat two on every dataset measured; half an epoch of warm-up eases the
    # just-unfrozen blocks in (benchmarks/RESULTS.md, "Measurements behind defaults").
    return PhaseConfig(
        epochs=4, lr=1e-4, weight_decay=1e-2, augment="light", patience=4, unfreeze="auto", warmup_epochs=0.5
    )


def mixing_problems(mixup: float, cutmix: float, class_balance: str, finetune_on: str) -> list[str]:
    """What is wrong with ``--finetune-mixup`` / ``--finetune-cutmix`` beside the other options."""
    found = [f"--finetune-{name} must be 0 or more, got {value}" for name, value in
             (("mixup", mixup), ("cutmix", cutmix)) if math.isfinite(value) and value < 0]
    if (mixup > 0 or cutmix > 0) and class_balance == "weight":
        found.append("--class-balance weight does not combine with --finetune-mixup or --finetune-cutmix (soft targets "
                     "carry no class weights); --class-balance sample balances the batches instead")
    if cutmix > 0 and finetune_on == "activations":
        found.append("--finetune-cutmix needs fine-tuning on images (a box on an activation map cuts whole objects); "
                     "use --finetune-mixup on activations, or --finetune-on images")
    return found
