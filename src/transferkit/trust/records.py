"""The records that make a model's answers trustworthy: its temperature and its unknown threshold,
as config.json, metrics.json and every export carry them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from transferkit.config import UNKNOWN_SCORES
from transferkit.models.metadata import Record
from transferkit.trust.temperature import Calibration

if TYPE_CHECKING:
    import torch


UNKNOWN = "unknown"
"""The answer of an image that is none of the classes."""

METHODS = tuple(score for score in UNKNOWN_SCORES if score != "none")
"""The unknown scores (see ``trust.unknown``)."""


@dataclass
class Rejection:
    """How a model says "none of these": the score, its threshold and where it was set."""

    method: str
    threshold: float
    keep: float
    """The share of in-distribution images meant to stay below the threshold."""
    kept: float
    """The share of the ``fitted_on`` images that did."""
    fitted_on: str
    images: int
    neighbours: int | None = None
    bank_images: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, values: Any, name: str = "unknown") -> Rejection:
        """The record as a model file holds it at ``name``; a ``FieldError`` names the first value
        that cannot be (no score is above a NaN threshold, so nothing would ever be unknown)."""
        record = Record(values, name)
        return cls(
            method=record.choice("method", METHODS),  # type: ignore[arg-type]  # not optional: never None
            threshold=record.number("threshold"),
            keep=record.number("keep", 1e-9, 1, "a number in (0, 1]"),
            kept=record.number("kept", 0, 1, "a number from 0 to 1"),
            fitted_on=record.text("fitted_on"),
            images=record.count("images"),  # type: ignore[arg-type]
            neighbours=record.count("neighbours", low=1, optional=True),
            bank_images=record.count("bank_images", optional=True),
        )


@dataclass
class Trust:
    calibration: Calibration | None = None
    rejection: Rejection | None = None
    bank: torch.Tensor | None = None
    """The training images' normalised pooled features, for the ``knn`` score."""

    @property
    def temperature(self) -> float:
        return self.calibration.temperature if self.calibration else 1.0

    def as_dict(self) -> dict[str, Any]:
        """The two records as config.json, metrics.json and an export's metadata hold them."""
        found: dict[str, Any] = {}
        if self.calibration is not None:
            found["calibration"] = self.calibration.as_dict()
        if self.rejection is not None:
            found["unknown"] = self.rejection.as_dict()
        return found
