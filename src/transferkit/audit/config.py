"""The audit's options: the data and model sections train has, and the audit's own.

Kept beside the audit rather than in ``config.py``: it is the one stage whose options no other
command reads, and ``config.py`` is at the size where a module gets split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transferkit.config import MAX_SEED, DataConfig, ModelConfig
from transferkit.data.config import help_text
from transferkit.errors import ConfigError, close_matches

DUPLICATE_THRESHOLD = 0.95
"""Cosine similarity of pooled EfficientNet-Lite0 features from which two images are reported as
near-copies (README's audit section has the measurements behind it)."""

DATA_SKIP = frozenset({"drop_duplicates", "splits_from"})
"""Data options that shape a training run, not what the audit looks at."""
MODEL_SKIP = frozenset({"drop_rate", "hidden_size"})
"""Head options: the audit uses the backbone's features only."""


@dataclass
class AuditConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output: str | None = field(default=None, metadata=help_text("folder for audit.csv, audit.json and audit.html; "
                                                             "default: runs/audit-<data>"))
    seed: int = field(default=42, metadata=help_text("seed of the split (as train's, so the splits are the same) and of the folds"))
    folds: int = field(default=5, metadata=help_text("folds of the out-of-sample predictions behind the label issues"))
    duplicate_threshold: float = field(
        default=DUPLICATE_THRESHOLD,
        metadata=help_text("cosine similarity of two images' features from which they are reported as near-copies (two "
                           "images each other's distinctly nearest are, from 0.8)"),
    )
    neighbours: int = field(
        default=10, metadata=help_text("nearest images looked at per image for near-copies")
    )
    cache_dir: str | None = field(
        default=None,
        metadata=help_text("feature cache folder (default: $TRANSFERKIT_CACHE/features, else ~/.cache/transferkit/features)"),
    )
    progress: bool = field(default=True, metadata=help_text(
        "show a progress bar while features are computed", cli_default="on when stderr is a terminal"))
    html: bool = field(default=True, metadata=help_text("write audit.html with thumbnails of what was found"))

    def __post_init__(self) -> None:
        self.data.split = tuple(float(f) for f in self.data.split)  # type: ignore[assignment]
        found = self.data.problems() + self.model.problems()
        if self.folds < 2:
            found.append(f"--folds must be at least 2, got {self.folds}")
        if not (math.isfinite(self.duplicate_threshold) and 0 < self.duplicate_threshold <= 1):
            found.append(f"--duplicate-threshold must be above 0 and at most 1, got {self.duplicate_threshold}")
        if self.neighbours < 1:
            found.append(f"--neighbours must be at least 1, got {self.neighbours}")
        if not 0 <= self.seed <= MAX_SEED:
            found.append(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if found:
            raise ConfigError(found)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AuditConfig:
        """The defaults with flat overrides named like the flags (``{"data.image_size": 224, "folds": 3}``)."""
        sections: dict[str, dict[str, Any]] = {"data": {}, "model": {}}
        top: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)} - set(sections)
        names = sorted(known) + [f"{s}.{f.name}" for s, kind in (("data", DataConfig), ("model", ModelConfig))
                                 for f in dataclasses.fields(kind)]
        found = []
        for key, value in options.items():
            section, _, name = key.rpartition(".")
            if key in names and section:
                sections[section][name] = value
            elif key in known:
                top[key] = value
            else:
                found.append(f"{key!r} is not an AuditConfig option.{close_matches(key, names)}")
        if found:
            raise ConfigError(found)
        if "split" in sections["data"]:
            sections["data"]["split"] = tuple(sections["data"]["split"])
        return cls(data=DataConfig(**sections["data"]), model=ModelConfig(**sections["model"]), **top)
