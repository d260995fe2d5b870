"""How an option's text becomes a config field's value."""

from __future__ import annotations

import argparse
from typing import Any


def fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.8,0.16,0.04, got {text!r}") from None


def number_or_auto(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def converter(kind: Any) -> Any:
    """The argparse ``type`` of a config field annotated ``kind``."""
    text = str(kind)
    if text == "float | str":
        return number_or_auto
    if "tuple" in text:
        return fractions
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def as_words(flag: str, value: Any) -> list[str]:
    """An option's value back as words on a command line: ``--finetune-epochs 8``, ``--no-audit``."""
    if isinstance(value, bool):
        return [flag if value else f"--no-{flag.removeprefix('--')}"]
    return [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
