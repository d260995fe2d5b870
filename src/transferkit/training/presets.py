"""Quality presets: named bundles of existing options, from today's defaults (``fast``) to the most
accurate recipe measured (``best``), and ``--time-limit``'s duration. An option given with a preset,
on the command line, in ``--config`` or in Python, overrides the preset's value; the recipes and
their measurements are in benchmarks/RESULTS.md, "Quality presets"."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The defaults, exactly: a preset that changes nothing keeps every earlier run reproducible.
    "fast": {},
    # Twice the fine-tuning on six blocks, with two cached augmented views read in turn, drawn by
    # TrivialAugment (at least as accurate as light views and as none at every seed measured:
    # benchmarks/RESULTS.md, "Cached views drawn by timm's RandAugment").
    "balanced": {"finetune.epochs": 8, "finetune.patience": 8, "finetune.unfreeze": "6", "finetune_views": 2,
                 "finetune_view_policy": "trivialaugment"},
    # The largest embedded backbone at its own 260 px, with the balanced recipe's fine-tuning.
    "best": {"model.name": "tf_efficientnet_lite2", "finetune.epochs": 8, "finetune.patience": 8,
             "finetune.unfreeze": "6", "finetune_views": 2, "finetune_view_policy": "trivialaugment"},
}
PRESET_KEYS = frozenset(key for options in PRESETS.values() for key in options)
"""The options some preset sets: given beside one, they stay whichever preset is chosen."""
AUTO = "auto"
"""With ``--time-limit``: the most accurate preset whose estimate fits; without one, ``fast``."""
PRESET_NAMES = (*PRESETS, AUTO)
DEFAULT_PRESET = "fast"

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def preset_keys_among(keys: Iterable[str]) -> tuple[str, ...]:
    """The options of ``keys`` that some preset sets (``epochs`` is both phases'), which a preset
    chosen later, as ``auto`` chooses one, must leave as given."""
    expanded = {part for key in keys for part in (("frozen.epochs", "finetune.epochs") if key == "epochs" else (key,))}
    return tuple(sorted(expanded & PRESET_KEYS))


def preset_options(name: str) -> dict[str, Any]:
    """The flat options (``TrainConfig.from_options`` keys) preset ``name`` sets; ``auto`` sets
    ``fast``'s until the data is known."""
    return dict(PRESETS.get(name, {}))


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``20m``, ``1.5h``, ``1h30m``; a bare number is minutes.
    Raises ``ValueError`` on anything else or on a duration that is not above zero."""
    cleaned = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        seconds = float(cleaned) * 60
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", cleaned)
        if not parts or "".join(number + unit for number, unit in parts) != cleaned:
            raise ValueError(text)
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not seconds > 0:
        raise ValueError(text)
    return seconds


def format_minutes(seconds: float) -> str:
    """``about 3 min``, ``about 40 s``: an estimate said no more precisely than it is."""
    if seconds < 90:
        return f"about {max(10, round(seconds, -1)):.0f} s"
    return f"about {round(seconds / 60)} min"
