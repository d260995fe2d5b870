"""The model section of a run's options (``--model``, ``--weights``, the head), read by train,
compare and audit alike; ``config`` holds it with the others."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transferkit.data.config import help_text
from transferkit.errors import non_finite_problems

DEFAULT_MODEL = "tf_efficientnet_lite0"
GLOBAL_POOLS = ("avg", "max", "avgmax")


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
        found = non_finite_problems(self)
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
