"""What a saved model carries beside its weights so its answers can be trusted: the temperature
that calibrates its confidence (``calibration``) and the score and threshold with which it
answers "unknown" (``rejection``).

Both live in the model folder's ``config.json``, under ``transferkit``, as ``calibration`` and
``unknown``; the ``knn`` score's training features are ``unknown_bank.safetensors`` beside the
weights. A model folder without them (older runs, ``--no-calibrate --unknown-score none``)
predicts as before. Exports carry the same two records in their metadata, and the graph
computes the calibrated logits and the score itself. Whatever reads them checks every value
(``Calibration.from_dict``, ``Rejection.from_dict``, ``check_bank``): a NaN temperature or
threshold does not fail, it answers wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit._io import atomic_write, read_json, write_json
from transferkit.calibration import Calibration
from transferkit.config import UNKNOWN_SCORES
from transferkit.errors import RunFolderError
from transferkit.validation import FieldError, Record, shown

if TYPE_CHECKING:
    import torch

BANK_FILE = "unknown_bank.safetensors"
METHODS = tuple(score for score in UNKNOWN_SCORES if score != "none")
"""The unknown scores (see ``rejection``)."""


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


def save_trust(folder: Path, trust: Trust) -> None:
    """Write ``trust`` into the model folder, replacing what it held."""
    config_file = folder / "config.json"
    config = read_json(config_file)
    extra = config.setdefault("transferkit", {})
    for key in ("calibration", "unknown"):
        extra.pop(key, None)
    extra.update(trust.as_dict())
    if trust.bank is not None:
        from safetensors.torch import save_file

        bank = trust.bank.detach().float().contiguous()
        atomic_write(folder / BANK_FILE, lambda tmp: save_file({"bank": bank}, str(tmp)))
    else:
        (folder / BANK_FILE).unlink(missing_ok=True)
    write_json(config_file, config)


REFIT = "refit it with `transferkit calibrate RUN`"


def load_trust(folder: Path, config: dict[str, Any], width: int | None = None) -> Trust:
    """The Trust of a model folder whose ``config.json`` is ``config``, every value checked. With
    the backbone's feature ``width``, the knn score's training features are read and checked
    against it; without, they are not read (``calibrate`` rebuilds them where they are lost)."""
    config_file = folder / "config.json"
    extra = config.get("transferkit") or {}
    trust = Trust()
    try:
        if extra.get("calibration") is not None:
            trust.calibration = Calibration.from_dict(extra["calibration"], "transferkit.calibration")
        if extra.get("unknown") is not None:
            trust.rejection = Rejection.from_dict(extra["unknown"], "transferkit.unknown")
    except FieldError as error:
        raise RunFolderError(f"{config_file}: {error}; {REFIT}") from None
    if trust.rejection is not None and trust.rejection.method == "knn" and width is not None:
        trust.bank = load_bank(folder, width)
    return trust


def load_bank(folder: Path, width: int) -> torch.Tensor:
    """The knn score's training features kept in a model folder, checked against the backbone's
    feature ``width``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / BANK_FILE
    try:
        found = load_file(str(path))["bank"]
    except (OSError, KeyError, SafetensorError) as error:
        raise RunFolderError(
            f"{path} is missing or damaged ({error}); the knn unknown score needs it: "
            "refit with `transferkit calibrate RUN` or train again"
        ) from None
    try:
        return check_bank(found, width)
    except FieldError as error:
        raise RunFolderError(f"{path}: {error}; {REFIT}") from None


def check_bank(bank: Any, width: int) -> torch.Tensor:
    """``bank`` when it can be the knn score's training features of a backbone of ``width``
    features: else a ``FieldError``, since a row longer than 1 makes every image look familiar."""
    import torch

    expected = f"a non-empty 2-D float32 tensor of {width} columns, each row of length 1, all finite"
    if not isinstance(bank, torch.Tensor) or bank.dtype != torch.float32 or bank.ndim != 2:
        is_tensor = isinstance(bank, torch.Tensor)
        found = f"a {bank.dtype} tensor of shape {tuple(bank.shape)}" if is_tensor else shown(bank)
        raise FieldError(f"bank is {found}; it must be {expected}")
    if bank.shape[0] == 0 or bank.shape[1] != width:
        raise FieldError(f"bank has shape {tuple(bank.shape)}; it must be {expected}")
    if not torch.isfinite(bank).all():
        raise FieldError(f"bank holds NaN or infinite values; it must be {expected}")
    lengths = bank.norm(dim=1)
    # normalized_bank leaves an all-zero feature row at zero, which is similar to nothing.
    if not ((lengths - 1).abs().le(1e-3) | lengths.eq(0)).all():
        raise FieldError(
            f"bank has rows of length {lengths.min():.4g} to {lengths.max():.4g}; it must be {expected}"
        )
    return bank
