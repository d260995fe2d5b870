"""The model folder: weights, timm's config and what makes the answers trustworthy, saved and loaded with every value checked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferkit._io import atomic_write, read_json, write_json
from transferkit.config import ModelConfig
from transferkit.errors import RunFolderError
from transferkit.models.create import create_head, replace_classifier
from transferkit.models.metadata import FieldError, shown
from transferkit.trust.records import Rejection, Trust
from transferkit.trust.temperature import Calibration

if TYPE_CHECKING:
    import torch

MODEL_FORMAT_VERSION = 1


def save_model_folder(
    model: nn.Module,
    folder: Path,
    classes: list[str],
    preprocessing: dict[str, Any],
    model_config: ModelConfig,
) -> None:
    """timm's local-dir layout: config.json + model.safetensors, both written atomically."""
    from safetensors.torch import save_file

    architecture = model.pretrained_cfg.get("architecture") or model_config.name
    pretrained_cfg = {
        key: value
        for key, value in model.pretrained_cfg.items()
        if key not in ("url", "hf_hub_id", "file", "state_dict", "source")
    }
    pretrained_cfg.update(
        num_classes=len(classes),
        input_size=list(preprocessing["input_size"]),
        mean=list(preprocessing["mean"]),
        std=list(preprocessing["std"]),
        interpolation=preprocessing["interpolation"],
        crop_pct=preprocessing["crop_pct"],
        crop_mode=preprocessing.get("crop_mode", "center"),
    )
    model_args = {"global_pool": model_config.global_pool, **pretrained_cfg.pop("architecture_args", {})}
    config = {
        "architecture": architecture,
        "num_classes": len(classes),
        "num_features": int(model.num_features),
        "global_pool": model_config.global_pool,
        "label_names": list(classes),
        "pretrained_cfg": pretrained_cfg,
        "model_args": model_args,
        "transferkit": {
            "format_version": MODEL_FORMAT_VERSION,
            "hidden_size": model_config.hidden_size,
            "drop_rate": model_config.drop_rate,
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in preprocessing.items()},
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_json(folder / "config.json", config)


def load_model(folder: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved classifier (any head) in eval mode; returns (model, config.json)."""
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file() or not (folder / "model.safetensors").is_file():
        raise RunFolderError(f"{folder} is not a model folder: expected config.json and model.safetensors")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"{config_file} is not valid JSON ({error}); train or export the model again") from None
    missing = [key for key in ("architecture", "num_classes") if key not in config]
    if missing:
        raise RunFolderError(
            f"{config_file} has no {', '.join(missing)}: not a transferkit or timm model folder "
            "(or one from an incompatible version); train the model again"
        )
    labels = config.get("label_names")
    if labels is not None and (
        not isinstance(labels, list) or len(labels) != config["num_classes"] or len(set(map(str, labels))) != len(labels)
    ):
        count = len(labels) if isinstance(labels, list) else "no list of"
        raise RunFolderError(
            f"{config_file} names {count} labels for {config['num_classes']} classes (label_names must list each "
            "class once, in the order of the model's outputs); predictions would carry the wrong names, "
            "so fix label_names or train the model again"
        )
    extra = config.get("transferkit") or {}
    if extra.get("format_version", MODEL_FORMAT_VERSION) > MODEL_FORMAT_VERSION:
        raise RunFolderError(
            f"{folder} was written by a newer transferkit (format {extra['format_version']}); upgrade transferkit"
        )
    model = timm.create_model(
        config["architecture"],
        pretrained=False,
        num_classes=config["num_classes"],
        pretrained_cfg_overlay=config.get("pretrained_cfg"),
        **(config.get("model_args") or {}),
    )
    if extra.get("hidden_size"):
        head = create_head(model.num_features, config["num_classes"], extra["hidden_size"], extra.get("drop_rate", 0.0))
        replace_classifier(model, head)
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except (RuntimeError, OSError, SafetensorError) as error:
        reason = " ".join(str(error).split())[:240]  # PyTorch's first line only says "Error(s) in loading"
        raise RunFolderError(
            f"{folder / 'model.safetensors'} does not fit the model config.json describes ({reason}); "
            "train or export the model again"
        ) from None
    return model.eval(), config


BANK_FILE = "unknown_bank.safetensors"


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
