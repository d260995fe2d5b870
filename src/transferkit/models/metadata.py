"""Checks of what a model folder's ``config.json`` or an export's metadata says about its model:
the class names, the preprocessing, and the fields of the trust records (``Calibration`` and
``Rejection`` read theirs through ``Record``).

A file on disk may be damaged, hand-edited or written by another tool, and a NaN temperature or
a zero std does not fail: it answers NaN probabilities as the first class. So every value is
read as the type and range it must have, or refused with a ``FieldError`` that names the field,
what it holds and what it must hold; the loaders add the file and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MAX_SIDE = 4096
"""The largest input side: four times timm's largest inputs, and one image of it is already
200 MB of float32 (a side of 60,000 would ask for 43 GB)."""
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
"""The resampling filters ``data.images.preprocess_image`` knows."""


class FieldError(ValueError):
    """One field holds what the model cannot be used with: "FIELD is FOUND; it must be ..."."""


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Record:
    """A JSON object read from a model file, ``name`` its place in the file (``transferkit.unknown``),
    whose fields are taken one at a time, each checked."""

    def __init__(self, values: Any, name: str):
        if not isinstance(values, dict):
            raise FieldError(f"{name} is {shown(values)}; it must be a JSON object")
        self.values = values
        self.name = name

    def refuse(self, key: str, expected: str) -> FieldError:
        found = shown(self.values[key]) if key in self.values else "missing"
        return FieldError(f"{self.name}.{key} is {found}; it must be {expected}")

    def number(
        self, key: str, low: float = -math.inf, high: float = math.inf, expected: str = "a finite number",
    ) -> float:
        value = self.values.get(key)
        if not is_number(value) or not low <= value <= high:
            raise self.refuse(key, expected)
        return float(value)

    def count(self, key: str, low: int = 0, optional: bool = False) -> int | None:
        value = self.values.get(key)
        if value is None and optional:
            return None
        if not is_count(value) or value < low:
            raise self.refuse(key, f"a whole number of at least {low}")
        return int(value)

    def text(self, key: str) -> str:
        value = self.values.get(key)
        if not isinstance(value, str):
            raise self.refuse(key, "a string")
        return value

    def choice(self, key: str, choices: Iterable[str], optional: bool = False) -> str | None:
        choices = tuple(choices)
        value = self.values.get(key)
        if value is None and optional:
            return None
        if value not in choices:
            raise self.refuse(key, f"one of {', '.join(choices)}")
        return str(value)

    def triple(self, key: str, valid: Any, expected: str) -> list[Any]:
        value = self.values.get(key)
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(valid(v) for v in value):
            raise self.refuse(key, expected)
        return list(value)


def check_classes(classes: Any, outputs: int | None, field: str) -> list[str]:
    """``classes`` as a list, when it names each of the model's ``outputs`` once, in strings."""
    if not isinstance(classes, list) or not classes or not all(isinstance(name, str) for name in classes):
        raise FieldError(f"{field} is {shown(classes)}; it must be a list of class names (strings)")
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise FieldError(f"{field} names {', '.join(map(repr, repeated))} more than once; each class must be "
                         "named once, in the order of the model's outputs")
    if outputs is not None and len(classes) != outputs:
        raise FieldError(f"{field} lists {len(classes)} class name{'s' * (len(classes) != 1)} for a model of "
                         f"{outputs} outputs; it must name one per output, in their order")
    return list(classes)


def check_preprocessing(preprocessing: Any, field: str) -> dict[str, Any]:
    """``preprocessing`` (timm's data config: input_size, mean, std, crop_pct, interpolation) with
    its ``input_size`` a tuple, when every value can feed the model."""
    record = Record(preprocessing, field)
    size = record.triple("input_size", is_count, f"3 whole numbers (3, height, width), sides 1 to {MAX_SIDE}")
    if size[0] != 3 or not all(1 <= side <= MAX_SIDE for side in size[1:]):
        raise record.refuse("input_size", f"3 whole numbers (3, height, width), sides 1 to {MAX_SIDE}")
    record.triple("mean", is_number, "3 finite numbers")
    record.triple("std", lambda v: is_number(v) and v > 0, "3 finite numbers above 0")
    if "crop_pct" in preprocessing:
        # Below 0.1 the image is resized to over ten times the input side before the crop keeps its centre.
        record.number("crop_pct", 0.1, 1.0, "a number from 0.1 to 1 (the share of the resized image kept)")
    record.choice("interpolation", INTERPOLATIONS, optional=True)
    return {**preprocessing, "input_size": tuple(size)}
