"""One typed dataclass per stage. Every field's ``help`` becomes the CLI's ``--help``. ``TrainConfig``
composes the sections that live beside what they configure; every name stays importable from here.

Problems are raised together (``ConfigError``), each naming its flag, so a user fixes them in one
go. The data is ``train``'s first parameter, not config: a config holds only how to train.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transferkit.data.config import VIEW_POLICIES, DataConfig, flat_options, help_text
from transferkit.errors import ConfigError, close_matches, non_finite_problems, raise_together
from transferkit.models.config import DEFAULT_MODEL, GLOBAL_POOLS, ModelConfig
from transferkit.training.config import (
    AUGMENTATIONS,
    FEW_BLOCKS,
    MANY_BLOCKS,
    MANY_BLOCKS_FROM,
    MAX_LR,
    OPTIMIZERS,
    SCHEDULERS,
    PhaseConfig,
    default_finetune_phase,
    default_frozen_phase,
    logger_problems,
    lr_is_auto,
    mixing_problems,
    parse_unfreeze,
    unfreeze_is_auto,
)
from transferkit.training.presets import (
    AUTO,
    DEFAULT_PRESET,
    PRESET_NAMES,
    parse_duration,
    preset_keys_among,
    preset_options,
)
from transferkit.training.trainer_options import lightning_option_problems, parse_devices

__all__ = [
    "AUGMENTATIONS", "BATCHNORM_POLICIES", "CLASS_BALANCE", "DEFAULT_MODEL", "FEW_BLOCKS", "FINETUNE_INPUTS",
    "GLOBAL_POOLS", "MANY_BLOCKS", "MANY_BLOCKS_FROM", "MAX_LR", "MAX_SEED", "OPTIMIZERS", "SCHEDULERS",
    "UNKNOWN_SCORES", "DataConfig", "ModelConfig", "PhaseConfig", "TrainConfig", "default_finetune_phase",
    "default_frozen_phase", "lr_is_auto", "parse_unfreeze", "unfreeze_is_auto",
]

CLASS_BALANCE = ("none", "weight", "sample")
BATCHNORM_POLICIES = ("frozen", "train")
FINETUNE_INPUTS = ("auto", "activations", "images")
UNKNOWN_SCORES = ("msp", "energy", "knn", "none")
MAX_SEED = 2**32 - 1  # NumPy's and Lightning's seeding take unsigned 32-bit seeds


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    frozen: PhaseConfig = field(default_factory=default_frozen_phase)
    finetune: PhaseConfig = field(default_factory=default_finetune_phase)
    preset: str = field(default=DEFAULT_PRESET, metadata=help_text(
        "a named bundle of options: fast (the defaults), balanced, best (a larger backbone, longer fine-tuning; "
        "1.3-3.6x fast's time in benchmarks/RESULTS.md), or auto (with --time-limit: the best whose estimate fits; the default there); "
        "an option given as well, or in --config, overrides the preset's"))
    preset_overrides: tuple[str, ...] = field(default=(), metadata=help_text("a preset's options given beside it"))
    time_limit: str | None = field(default=None, metadata=help_text(
        "most wall time, e.g. 20m, 90s, 1.5h: picks the preset (auto), and a phase that would run past it stops "
        "at an epoch's end, keeping its best epoch so far"))
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
    finetune_mixup: float = field(
        default=0.0,
        metadata=help_text("fine-tuning mixes each training batch by timm's Mixup with this alpha (0: off), on images "
                           "or on cached activations (manifold mixup), with soft targets"),
    )
    finetune_cutmix: float = field(
        default=0.0,
        metadata=help_text("fine-tuning on images cuts and pastes between images by timm's CutMix with this alpha "
                           "(0: off); with mixup too, each batch gets one of them"),
    )
    finetune_view_policy: str = field(
        default="light",
        metadata=help_text(
            "how --finetune-views are drawn: light (random crop and mirror), randaugment (then timm's RandAugment "
            f"{VIEW_POLICIES['randaugment']}) or trivialaugment (then one timm RandAugment op at a uniform "
            "magnitude, as TrivialAugment)"
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
    progress: bool = field(default=True, metadata=help_text(
        "show progress bars", cli_default="on when stderr is a terminal"))
    report: bool = field(default=True, metadata=help_text("write figures and report.html at the end"))
    logger: str = field(default="none", metadata=help_text(
        "experiment tracking through Lightning's loggers, several comma-separated: csv, tensorboard, mlflow, "
        "wandb (config, every epoch of both phases, final metrics, model and figures; files in RUN/logs)"))
    mlflow_uri: str | None = field(default=None, metadata=help_text(
        "MLflow tracking URI for --logger mlflow; unset: a SQLite store in the run folder, sqlite:///RUN/logs/mlflow.db"))

    def __post_init__(self) -> None:
        self.data.split = tuple(float(f) for f in self.data.split)  # type: ignore[assignment]
        self.preset_overrides = tuple(self.preset_overrides)  # a list, read back from config.yaml
        found = non_finite_problems(self) + self.data.problems() + self.model.problems()
        found += self.frozen.problems("frozen") + self.finetune.problems("finetune")
        if self.preset not in PRESET_NAMES:
            found.append(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {self.preset!r}"
                         f"{close_matches(self.preset, list(PRESET_NAMES))}")
        if self.time_limit is not None:
            try:
                parse_duration(self.time_limit)
            except ValueError:
                found.append(f"--time-limit must be a duration like 20m, 90s or 1.5h, got {self.time_limit!r}")
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
        found += mixing_problems(self.finetune_mixup, self.finetune_cutmix, self.class_balance, self.finetune_on)
        if self.finetune_view_policy not in VIEW_POLICIES:
            found.append(f"--finetune-view-policy must be one of {', '.join(VIEW_POLICIES)}, "
                         f"got {self.finetune_view_policy!r}")
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
        found += logger_problems(self.logger, self.mlflow_uri)
        if found:
            raise ConfigError(found)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrainConfig:
        """The defaults with flat overrides named like the flags: ``{"frozen.epochs": 10, "seed": 0}``
        for ``--frozen-epochs 10 --seed 0``; ``{"epochs": 3}`` (``--epochs 3``) is both phases' most
        epochs, where ``frozen.epochs`` or ``finetune.epochs`` is not given. ``{"preset": "best"}``
        sets that preset's options under the others given. Unknown keys and invalid values are
        raised together."""
        values = cls().to_dict()
        known = [f"{key}.{name}" for key, section in values.items() if isinstance(section, dict) for name in section]
        known += [key for key, value in values.items() if not isinstance(value, dict)] + ["epochs"]
        found = []
        # A preset is the base every option given overrides; a time limit alone lets the data choose it.
        options = {"preset": AUTO if options.get("time_limit") else DEFAULT_PRESET,
                   "preset_overrides": preset_keys_among(options), **options}
        options = {**preset_options(str(options["preset"])), **options}
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

    def with_options(self, options: Mapping[str, Any]) -> TrainConfig:
        """This config with flat overrides, as ``from_options`` takes them; ``epochs`` sets each
        phase that ``options`` does not. A new ``preset`` replaces the values the old one set and
        keeps those changed from it."""
        if not options:
            return self
        flat = flat_options(self.to_dict())
        if "preset" in options:  # the values the old preset set go, those given beside it stay
            before = flat_options(TrainConfig.from_options({"preset": self.preset}).to_dict())
            flat = {key: value for key, value in flat.items()
                    if key in self.preset_overrides or before.get(key) != value}
        if "epochs" in options:
            flat = {key: value for key, value in flat.items() if key not in ("frozen.epochs", "finetune.epochs")}
        given = preset_keys_among([*options, *self.preset_overrides])
        return self.from_options({**flat, **options, "preset_overrides": given})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_record(self, source: str) -> dict[str, Any]:
        """What a run folder saves: these values with the data source first in ``data``."""
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
