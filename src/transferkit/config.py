"""One typed dataclass per stage. Every field's ``help`` becomes the CLI's ``--help``.

Problems are collected and raised together (``ConfigError``) so a user fixes them in one go,
and each names the flag to change. The data a run trains on is not part of its config: it is
``train``'s first parameter (``transferkit.train("photos/", TrainConfig())``), so a config holds
only how to train and has no required value disguised as a default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transferkit.data.config import DataConfig, help_text
from transferkit.errors import ConfigError, close_matches, raise_together
from transferkit.training.trainer_options import lightning_option_problems, parse_devices

DEFAULT_MODEL = "tf_efficientnet_lite0"
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
SCHEDULERS = ("cosine", "step", "plateau", "constant")
AUGMENTATIONS = ("none", "light", "strong")
CLASS_BALANCE = ("none", "weight", "sample")
BATCHNORM_POLICIES = ("frozen", "train")
FINETUNE_INPUTS = ("auto", "activations", "images")
GLOBAL_POOLS = ("avg", "max", "avgmax")
UNKNOWN_SCORES = ("msp", "energy", "knn", "none")
# --finetune-unfreeze auto: how many top backbone blocks fine-tuning trains. Six cost twice the
# fine-tuning time of three and 2.3x the activations (EfficientNet-Lite0 at 256 px), and paid only
# from a few thousand training images (benchmarks/finetune_inputs.py, activations-4-bf16 against
# -unfreeze6, means of seeds 42, 1, 2): cifar10 (41,670 training images) test 0.8986 against 0.8757
# (seed 42), chest X-rays (4,346) val 0.9770 against 0.9713 and test 0.8007 against 0.7922, but
# tf_flowers (2,934) 0.9357 against 0.9366 in 138 s against 85 s, hymenoptera (244) 0.9564 against
# 0.9542 (one image of 153 over the three seeds). cifar10_subset (4,170; seed 42, by hand) gained
# 2.5 points. The line sits in the gap between the sizes measured to gain and not.
FEW_BLOCKS, MANY_BLOCKS, MANY_BLOCKS_FROM = 3, 6, 4_000


def _non_finite(section: Any, flag_prefix: str = "") -> list[str]:
    """NaN or infinity in any number of ``section``: every range check below compares false
    with NaN, so ``--split nan,0.5,0.5`` would pass them all and train on two images."""
    found = []
    for spec in dataclasses.fields(section):
        value = getattr(section, spec.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(n, float) and not math.isfinite(n) for n in numbers):
            shown = ",".join(map(str, numbers)) if isinstance(value, tuple) else value
            found.append(f"--{flag_prefix}{spec.name.replace('_', '-')} must be a finite number, got {shown}")
    return found


MAX_SEED = 2**32 - 1  # NumPy's and Lightning's seeding take unsigned 32-bit seeds
MAX_LR = 1e30
"""Beyond it an optimizer's step overflows float32 (Adam divides the rate by 0.1 on its first step)
and fails mid-phase with a traceback; a large rate below it diverges, which train reports in one line."""


@dataclass
class ModelConfig:
    name: str = field(default=DEFAULT_MODEL, metadata=help_text("any timm model name", flag="--model"))
    weights: str | None = field(
        default=None,
        metadata=help_text(
            "pretrained weights: default = embedded (EfficientNet-Lite) or timm's hub/cache; "
            "a .pth/.safetensors file; local-dir:FOLDER (timm layout); or 'none' for random init"
        ),
    )
    drop_rate: float = field(default=0.2, metadata=help_text("dropout before the classifier"))
    hidden_size: int | None = field(
        default=None,
        metadata=help_text("add a hidden dense layer of this width to the head (e.g. 1024)"),
    )
    global_pool: str = field(default="avg", metadata=help_text(f"pooling: {', '.join(GLOBAL_POOLS)}"))

    def problems(self) -> list[str]:
        found = _non_finite(self)
        if math.isfinite(self.drop_rate) and not 0 <= self.drop_rate < 1:
            found.append(f"--drop-rate must be in [0, 1), got {self.drop_rate}")
        if self.hidden_size is not None and self.hidden_size < 1:
            found.append(f"--hidden-size must be at least 1, got {self.hidden_size}")
        if self.global_pool not in GLOBAL_POOLS:
            found.append(f"--global-pool must be one of {', '.join(GLOBAL_POOLS)}, got {self.global_pool!r}")
        return found

    @property
    def pretrained(self) -> bool:
        return (self.weights or "").lower() not in ("none", "random", "scratch")


@dataclass
class PhaseConfig:
    epochs: int = field(default=0, metadata=help_text("epochs (0 skips the phase)"))
    lr: float = field(default=1e-3, metadata=help_text("peak learning rate"))
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
        found = _non_finite(self, f"{p}-")
        if self.epochs < 0:
            found.append(f"--{p}-epochs must be 0 or more, got {self.epochs}")
        if math.isfinite(self.lr) and not 0 < self.lr <= MAX_LR:
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
    # Four epochs, now that an epoch on cached activations costs a fifth of one on images: against
    # two, mean val accuracy over seeds 42, 1, 2 (benchmarks/finetune_inputs.py, activations-4)
    # tf_flowers 0.9366 against 0.9303 (every seed up), hymenoptera 0.9542 against 0.9521, chest
    # X-rays 0.9713 against 0.9705 (test split 0.7895 against 0.7879); a cold run 1.4x as long.
    # Patience 4, as measured.
    # Half an epoch of warm-up eases the just-unfrozen blocks in (DEVELOPERS.md has the runs).
    return PhaseConfig(
        epochs=4, lr=1e-4, weight_decay=1e-2, augment="light", patience=4, unfreeze="auto", warmup_epochs=0.5
    )


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    frozen: PhaseConfig = field(default_factory=default_frozen_phase)
    finetune: PhaseConfig = field(default_factory=default_finetune_phase)
    output: str | None = field(
        default=None, metadata=help_text("run folder; default: runs/<data>-<model>-<time>")
    )
    seed: int = field(default=42, metadata=help_text("seed for the split, initialisation and shuffling"))
    label_smoothing: float = field(default=0.1, metadata=help_text("label smoothing of the loss"))
    class_balance: str = field(
        default="none",
        metadata=help_text("imbalanced data: none, weight (loss weights) or sample (balanced sampling)"),
    )
    batchnorm: str = field(
        default="frozen",
        metadata=help_text(
            "frozen: every batch norm keeps its ImageNet statistics, also in unfrozen blocks; "
            "train: unfrozen blocks update their statistics"
        ),
    )
    finetune_on: str = field(
        default="auto",
        metadata=help_text(
            "auto: the unfrozen top trains on the cached output of the frozen blocks below it where "
            "they can be cached (not every block unfrozen, an EfficientNet or ResNet), about 5x faster "
            "per epoch, else on images; images: every epoch through the whole backbone, augmented in "
            "image space; activations: only on them (an error where they cannot be cached)"
        ),
    )
    finetune_views: int = field(
        default=0,
        metadata=help_text(
            "with fine-tuning on activations: also cache the activations of N views of every training image "
            "(the light augmentation's random crop and mirror, the same in every run); epoch e trains on view "
            "e mod (N+1), view 0 being the image itself"
        ),
    )
    activation_cache_gb: float = field(
        default=20.0,
        metadata=help_text("largest size of a run's cached activations, views included, in GB of disk (read from "
                      "there a batch at a time, never all held in memory); above it fine-tuning runs on images"),
    )
    feature_cache: bool = field(
        default=True,
        metadata=help_text(
            "train the frozen-phase head on backbone features computed once per image and kept "
            "in the feature cache for later runs"
        ),
    )
    cache_dir: str | None = field(
        default=None,
        metadata=help_text("feature cache folder (default: $TRANSFERKIT_CACHE/features, else ~/.cache/transferkit/features)"),
    )
    accelerator: str = field(default="auto", metadata=help_text("Lightning accelerator: auto, cpu, gpu, ..."))
    devices: str = field(default="auto", metadata=help_text("Lightning devices: auto, a count or a list"))
    num_nodes: int = field(default=1, metadata=help_text("machines for multi-node training"))
    strategy: str = field(default="auto", metadata=help_text("Lightning strategy: auto, ddp, ..."))
    precision: str = field(default="auto", metadata=help_text(
        "Lightning precision: auto (bf16-mixed on a CPU with AMX or AVX512-BF16, else 32-true), 32-true, bf16-mixed, 16-mixed"))
    calibrate: bool = field(default=True, metadata=help_text("fit a temperature on val so confidence matches accuracy"))
    unknown_score: str = field(default="knn", metadata=help_text(
        "how unlike the training images an image is, to answer unknown: knn (features against the "
        "training images'), msp, energy, or none"))
    unknown_keep: float = field(default=0.95, metadata=help_text("share of val images the unknown threshold keeps"))
    audit: bool = field(default=True, metadata=help_text(
        "audit the run's images at the end (label issues, near-copies, outliers; RUN/audit, seconds on cached features)"))
    progress: bool = field(default=True, metadata=help_text("show progress bars"))
    report: bool = field(default=True, metadata=help_text("write figures and report.html at the end"))

    def __post_init__(self) -> None:
        self.data.split = tuple(float(f) for f in self.data.split)  # type: ignore[assignment]
        found = _non_finite(self) + self.data.problems() + self.model.problems()
        found += self.frozen.problems("frozen") + self.finetune.problems("finetune")
        if self.class_balance not in CLASS_BALANCE:
            found.append(f"--class-balance must be one of {', '.join(CLASS_BALANCE)}, got {self.class_balance!r}")
        if math.isfinite(self.activation_cache_gb) and self.activation_cache_gb < 0:
            found.append(f"--activation-cache-gb must be 0 or more, got {self.activation_cache_gb}")
        if self.finetune_on not in FINETUNE_INPUTS:
            found.append(f"--finetune-on must be one of {', '.join(FINETUNE_INPUTS)}, got {self.finetune_on!r}")
        if self.finetune_views < 0:
            found.append(f"--finetune-views must be 0 or more, got {self.finetune_views}")
        elif self.finetune_views and self.finetune_on == "images":
            found.append(f"--finetune-views {self.finetune_views} needs fine-tuning on activations; "
                         "drop --finetune-on images (the default, auto, uses them where it can)")
        if self.unknown_score not in UNKNOWN_SCORES:
            found.append(f"--unknown-score must be one of {', '.join(UNKNOWN_SCORES)}, got {self.unknown_score!r}")
        if math.isfinite(self.unknown_keep) and not 0 < self.unknown_keep <= 1:
            found.append(f"--unknown-keep must be in (0, 1], got {self.unknown_keep}")
        if self.batchnorm not in BATCHNORM_POLICIES:
            found.append(f"--batchnorm must be one of {', '.join(BATCHNORM_POLICIES)}, got {self.batchnorm!r}")
        if math.isfinite(self.label_smoothing) and not 0 <= self.label_smoothing < 1:
            found.append(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.frozen.epochs == 0 and self.finetune.epochs == 0:
            found.append("--frozen-epochs and --finetune-epochs are both 0: nothing would train")
        if self.num_nodes < 1:
            found.append(f"--num-nodes must be at least 1, got {self.num_nodes}")
        if not 0 <= self.seed <= MAX_SEED:
            found.append(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        try:
            parse_devices(self.devices)
        except ValueError:
            found.append(
                f"--devices must be auto, a count of 1 or more (-1 for all) or a list like 0,1, got {self.devices!r}"
            )
        found += lightning_option_problems(self.accelerator, self.strategy, self.precision)
        if found:
            raise ConfigError(found)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrainConfig:
        """The defaults with flat overrides named like the flags: ``{"frozen.epochs": 10, "seed": 0}``
        for ``--frozen-epochs 10 --seed 0``; ``{"epochs": 3}`` (``--epochs 3``) is both phases' most
        epochs, where ``frozen.epochs`` or ``finetune.epochs`` is not given. Unknown keys and invalid
        values are raised together."""
        values = cls().to_dict()
        known = [f"{key}.{name}" for key, section in values.items() if isinstance(section, dict) for name in section]
        known += [key for key, value in values.items() if not isinstance(value, dict)] + ["epochs"]
        found = []
        options = dict(options)
        if "epochs" in options:
            # A shorthand, not a field: the config keeps each phase's own count, so a resumed run reads them.
            both = options.pop("epochs")
            if isinstance(both, int) and both >= 0:
                options = {"frozen.epochs": both, "finetune.epochs": both, **options}
            else:
                found.append(f"--epochs must be a count of 0 or more, got {both!r}")
        for key, value in options.items():
            section, _, name = key.rpartition(".")
            target = values.get(section) if section else values
            if not isinstance(target, dict) or name not in target or isinstance(target[name], dict):
                found.append(f"{key!r} is not a TrainConfig option.{close_matches(key, known)}")
            else:
                target[name] = value
        return raise_together(found, lambda: cls.from_dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_record(self, source: str) -> dict[str, Any]:
        """What a run folder saves: these values with the data source first in ``data``, the
        layout config.yaml has had since format 1, so earlier run folders still resume."""
        values = self.to_dict()
        values["data"] = {"source": source, **values["data"]}
        return values

    @classmethod
    def from_record(cls, values: dict[str, Any]) -> tuple[str, TrainConfig]:
        """``to_record``'s inverse: the data source and the config. A record without a source
        raises ``ValueError``, as a value of the wrong kind does."""
        data = values.get("data")
        source = data.get("source") if isinstance(data, dict) else None
        if not isinstance(source, str) or not source:
            raise ValueError("it names no data.source")
        return source, cls.from_dict({**values, "data": {k: v for k, v in data.items() if k != "source"}})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError([f"unknown config keys {unknown}: written by an incompatible version?"])
        parts: dict[str, Any] = dict(values)
        for name, kind in (("data", DataConfig), ("model", ModelConfig), ("frozen", PhaseConfig), ("finetune", PhaseConfig)):
            if name in parts:
                section = dict(parts[name])
                allowed = {f.name for f in dataclasses.fields(kind)}
                extra = sorted(set(section) - allowed)
                if extra:
                    raise ConfigError([f"unknown config keys {name}.{extra}: written by an incompatible version?"])
                if "split" in section:
                    section["split"] = tuple(section["split"])
                parts[name] = kind(**section)
        return cls(**parts)
