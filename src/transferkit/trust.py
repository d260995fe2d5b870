"""What a saved model carries beside its weights so its answers can be trusted: the temperature
that calibrates its confidence (``calibration``) and the score and threshold with which it
answers "unknown" (``rejection``).

Both live in the model folder's ``config.json``, under ``transferkit``, as ``calibration`` and
``unknown``; the ``knn`` score's training features are ``unknown_bank.safetensors`` beside the
weights. A model folder without them (older runs, ``--no-calibrate --unknown-score none``)
predicts as before. Exports carry the same two records in their metadata, and the graph
computes the calibrated logits and the score itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit._io import atomic_write, read_json, write_json
from transferkit.calibration import Calibration
from transferkit.errors import RunFolderError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from transferkit.rejection import Rejection

BANK_FILE = "unknown_bank.safetensors"


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


def load_trust(folder: Path, config: dict[str, Any], bank: bool = True) -> Trust:
    """The Trust of a model folder whose ``config.json`` is ``config``; without ``bank``, the knn
    score's training features are not read (``calibrate`` rebuilds them where they are lost)."""
    from transferkit.rejection import Rejection

    extra = config.get("transferkit") or {}
    trust = Trust()
    if extra.get("calibration"):
        trust.calibration = Calibration.from_dict(extra["calibration"])
    if extra.get("unknown"):
        trust.rejection = Rejection.from_dict(extra["unknown"])
        if trust.rejection.method == "knn" and bank:
            trust.bank = load_bank(folder)
    return trust


def load_bank(folder: Path) -> torch.Tensor:
    """The knn score's training features kept in a model folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / BANK_FILE
    try:
        return load_file(str(path))["bank"]
    except (OSError, KeyError, SafetensorError) as error:
        raise RunFolderError(
            f"{path} is missing or damaged ({error}); the knn unknown score needs it: "
            "refit with `transferkit calibrate RUN` or train again"
        ) from None


def scored_classifier(model: nn.Module, trust: Trust) -> nn.Module:
    """``model`` with its temperature and unknown score in the graph (see ``ScoredClassifier``)."""
    from transferkit.rejection import ScoredClassifier

    method = trust.rejection.method if trust.rejection else None
    neighbours = trust.rejection.neighbours if trust.rejection and trust.rejection.neighbours else 1
    return ScoredClassifier(model, trust.temperature, method, trust.bank, neighbours).eval()

