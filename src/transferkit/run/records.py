"""The typed records of a run folder's files: the run's config (config.yaml), ``EpochRecord``
(a row of history.csv), ``PhaseRecord`` (a phase in progress.json and metrics.json) and
``RunMetrics`` (metrics.json); ``RunFolder`` (``run.folder``) decides where each file lives.

Every allowance for a folder an earlier transferkit wrote is here, so it is dropped in one place.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transferkit.config import TrainConfig
from transferkit.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

RUN_FORMAT_VERSION = 1
"""config.yaml's layout: a folder of another version is refused rather than misread."""


class DamagedRecord(ValueError):
    """A record that cannot be read as what it should hold; the message says why."""


class OtherFormat(ValueError):
    """A record of another format version than this transferkit reads."""


def config_yaml(source: str, config: TrainConfig) -> str:
    """config.yaml: the data source first in ``data``, the format version last."""
    import yaml

    values = json.loads(json.dumps(config.to_record(source)))
    values["format_version"] = RUN_FORMAT_VERSION
    return yaml.safe_dump(values, sort_keys=False)


def config_from_yaml(content: bytes) -> tuple[str, TrainConfig]:
    """``config_yaml``'s inverse (see ``config_from_record``); damaged YAML is a ``DamagedRecord``."""
    import yaml

    try:
        values = yaml.safe_load(content.decode("utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise DamagedRecord(" ".join(str(error).split())[:160]) from None
    return config_from_record(values)


def config_from_record(values: Any) -> tuple[str, TrainConfig]:
    """config.yaml's values read back: the data source and the config; ``DamagedRecord`` for values
    that cannot be one, ``OtherFormat`` for another version's, ``ConfigError`` for options this one refuses."""
    if not isinstance(values, dict):
        raise DamagedRecord("not a mapping of options")
    values = dict(values)
    if "format_version" not in values:  # written last: a file cut short loses it
        raise DamagedRecord("no format_version")
    version = values.pop("format_version")
    if version != RUN_FORMAT_VERSION:
        raise OtherFormat(f"format version {version!r}, this transferkit reads {RUN_FORMAT_VERSION}")
    # Written before --finetune-on existed, when every run fine-tuned on images: a resumed run
    # goes on as it started, whatever the default is now.
    values.setdefault("finetune_on", "images")
    try:
        return TrainConfig.from_record(values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # a section that is not a mapping, a value of the wrong kind
        raise DamagedRecord(str(error)) from None


def saved_preprocessing(config: dict[str, Any], model: nn.Module) -> Any:
    """The preprocessing a model folder's config.json names, unchecked; the backbone's own where
    the folder names none (a plain timm folder, or one an earlier transferkit wrote)."""
    from transferkit.data.loaders import resolve_preprocessing

    return (config.get("transferkit") or {}).get("preprocessing") or resolve_preprocessing(model)

HISTORY_COLUMNS = [
    "phase", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
]


def _number(text: str, kind: type = float) -> Any:
    return kind(text) if text != "" else None


@dataclass
class EpochRecord:
    """One row of history.csv; a metric that was not measured is None (an empty cell)."""

    phase: str
    epoch: int
    train_loss: float | None = None
    train_acc: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    lr: float | None = None
    seconds: float | None = None

    def as_row(self) -> dict[str, Any]:
        return {k: "" if v is None else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> EpochRecord:
        values = {name: _number(row[name]) for name in HISTORY_COLUMNS[2:]}
        return cls(phase=row["phase"], epoch=int(row["epoch"]), **values)


@dataclass
class PhaseRecord:
    """What a phase left behind: in progress.json while the run trains, in metrics.json after.

    Fields left None are not written, so the JSON holds what is known and no more: a diverged
    phase has no best epoch, a phase is judged on val and test only once the run is evaluated.
    """

    done: bool = False
    best_checkpoint: str = ""
    """Relative to the run folder."""
    diverged: bool = False
    best_val_loss: float | None = None
    best_val_acc: float | None = None
    best_epoch: int | None = None
    epochs: int | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    trained_blocks: int | None = None
    """Backbone blocks that trained (``--finetune-unfreeze auto`` chooses by the data); None for the head alone."""
    fit_seconds: float | None = None
    """Training only, on the process that recorded the phase."""
    precision: str | None = None
    """Lightning's precision the phase trained in ('bf16-mixed' where --precision auto found the
    CPU's bf16 instructions; a resumed phase, that of its last part); None for the head on
    features, always float32."""
    stopped_at_time_limit: bool | None = None
    """True where ``--time-limit`` ended the phase before its epochs; None otherwise."""
    val: dict[str, Any] | None = None
    """Headline metrics of the phase's best checkpoint on the validation split."""
    test: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PhaseRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def default_split(split_names: Iterable[str]) -> str:
    """The split a run is judged on: test when the run has one, else validation."""
    return "test" if "test" in split_names else "val"


def phases_from_dict(values: dict[str, Any]) -> dict[str, PhaseRecord]:
    return {name: PhaseRecord.from_dict(record) for name, record in values.items()}


@dataclass
class RunMetrics:
    """metrics.json of a finished run: the saved model judged on each split, and every phase."""

    best_phase: str
    phases: dict[str, PhaseRecord]
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Headline metrics of the saved model per split (val, and test where the run has one)."""
    train_seconds: float = 0.0
    """Wall time of the invocation that finished the run (after a resume, the resumed part)."""
    features: dict[str, Any] | None = None
    """How the frozen phase's features were had (FeatureStats), where it trained on features."""
    trust: dict[str, Any] = field(default_factory=dict)
    """The saved model's temperature and unknown threshold, as fitted on val (see ``trust``)."""
    leaks: dict[str, Any] | None = None
    """Near-copies of training images in val and test: ``pairs`` and ``images`` per split, where
    any were found; a split listed there scores higher than it would on new images."""

    def inflated(self, split: str) -> int:
        """The near-copy pairs joining ``split`` to train (0: its score can be trusted that far)."""
        return int(((self.leaks or {}).get("pairs") or {}).get(split, 0))

    @property
    def val(self) -> dict[str, Any]:
        return self.splits["val"]

    @property
    def test(self) -> dict[str, Any] | None:
        return self.splits.get("test")

    @property
    def judged(self) -> dict[str, Any]:
        """The split a run is judged on: test when it has one, else validation."""
        return self.test or self.val

    def usable_phases(self) -> dict[str, PhaseRecord]:
        """The phases that did not diverge, in training order."""
        return {name: phase for name, phase in self.phases.items() if not phase.diverged}

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            **self.splits,
            "best_phase": self.best_phase,
            "phases": {name: phase.to_dict() for name, phase in self.phases.items()},
            "train_seconds": self.train_seconds,
        }
        if self.features is not None:
            values["features"] = self.features
        if self.leaks is not None:
            values["leaks"] = self.leaks
        values.update(self.trust)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunMetrics:
        return cls(
            best_phase=values["best_phase"],
            phases=phases_from_dict(values["phases"]),
            splits={split: values[split] for split in ("val", "test") if split in values},
            train_seconds=values.get("train_seconds", 0.0),
            features=values.get("features"),
            leaks=values.get("leaks"),
            trust={key: values[key] for key in ("calibration", "unknown") if key in values},
        )


def legacy_phase_state(saved: dict[str, Any] | None, rows: list[EpochRecord], epochs_done: int) -> dict[str, Any]:
    """A phase's bookkeeping state (``training.bookkeeping``) for a checkpoint an earlier transferkit
    wrote: from its History state ``saved`` (``epochs`` and the ``best`` row), else from the phase's
    ``rows`` of history.csv up to the ``epochs_done`` the checkpoint holds."""
    if saved is not None:
        epochs_done = int(saved["epochs"])
        best = EpochRecord.from_row({k: str(v) for k, v in saved["best"].items()}) if saved["best"] else None
    else:
        finite = [r for r in rows if r.epoch <= epochs_done and r.val_loss is not None and math.isfinite(r.val_loss)]
        best = min(finite, key=lambda r: r.val_loss) if finite else None  # type: ignore[arg-type, return-value]
    best_epoch = best.epoch if best else 0
    return {"epochs_done": epochs_done, "best_val_loss": best.val_loss if best else math.inf,
            "best_val_acc": best.val_acc if best else 0.0, "best_epoch": best_epoch,
            "epochs_without_improvement": epochs_done - best_epoch}
