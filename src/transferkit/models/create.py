"""Backbones from timm with a new classification head, and their pooled (pre-logits) features."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from transferkit.config import ModelConfig
from transferkit.errors import ConfigError, WeightsUnavailableError, close_matches, refused_pickle
from transferkit.models.weights import (
    EMBEDDED_TEST_INPUT_SIZE,
    create_from_hub,
    embedded_weights_file,
    load_embedded_state_dict,
)

log = logging.getLogger(__name__)


def _check_model_name(name: str) -> None:
    import timm

    if name.startswith(("local-dir:", "hf-hub:", "hf_hub:")):
        return
    if not timm.is_model(name):
        raise ConfigError(
            [f"unknown model {name!r}: not in timm's registry.{close_matches(name, timm.list_models())}"]
        )


def create_classifier(config: ModelConfig, num_classes: int, image_size: int | None = None) -> nn.Module:
    """A timm model with pretrained backbone weights (unless weights='none') and a new head, for
    square inputs of ``image_size`` (default: the weights' own size)."""
    import timm

    _check_model_name(config.name)
    weights = config.weights
    head_args: dict[str, Any] = {"drop_rate": config.drop_rate, "global_pool": config.global_pool}
    if not config.pretrained:
        model = timm.create_model(config.name, pretrained=False, num_classes=num_classes, **head_args)
    elif weights and weights.startswith("local-dir:"):
        model = _from_local_dir(Path(weights[len("local-dir:") :]).expanduser(), num_classes, head_args)
    elif weights:
        model = _from_weights_file(config.name, Path(weights).expanduser(), num_classes, head_args)
    elif (embedded := embedded_weights_file(config.name)) is not None:
        model = timm.create_model(config.name, pretrained=False, **head_args)
        model.load_state_dict(load_embedded_state_dict(model, embedded))
        model.reset_classifier(num_classes, global_pool=config.global_pool)
        if config.name in EMBEDDED_TEST_INPUT_SIZE:
            model.pretrained_cfg = {**model.pretrained_cfg, "test_input_size": EMBEDDED_TEST_INPUT_SIZE[config.name]}
    else:
        model = create_from_hub(config.name, num_classes, head_args)
    if image_size:
        _fit_input_size(model, image_size)
    if config.hidden_size:
        replace_classifier(model, create_head(model.num_features, num_classes, config.hidden_size, config.drop_rate))
    return model


def _from_local_dir(folder: Path, num_classes: int, head_args: dict[str, Any]) -> nn.Module:
    """``--weights local-dir:FOLDER``: a timm model folder, its architecture options kept with the model."""
    import timm

    if not (folder / "config.json").is_file():
        raise WeightsUnavailableError(
            f"{folder} is not a timm model folder: expected {folder}/config.json and model.safetensors"
        )
    # Architecture options the weights need (MobileNetV2's pad_type="same") travel with the
    # model, so the saved run folder rebuilds the same network.
    source = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    architecture_args = {
        k: v for k, v in (source.get("model_args") or {}).items()
        if k not in ("num_classes", "global_pool", "in_chans", "drop_rate")
    }
    model = timm.create_model(
        f"local-dir:{folder}", pretrained=True, num_classes=num_classes, **architecture_args, **head_args
    )
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture_args": architecture_args}
    return model


def _from_weights_file(name: str, path: Path, num_classes: int, head_args: dict[str, Any]) -> nn.Module:
    """``--weights FILE``: a state dict of ``name``'s architecture; anything else refused in one line."""
    import timm

    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {path} not found; pass --weights with a .pth/.safetensors state dict, "
            "--weights local-dir:FOLDER, or --weights none to train from scratch"
        )
    try:
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=num_classes,
            **head_args,
        )
    except Exception as error:  # not a state dict, a pickle that would run code, a wrong model
        text = str(error)
        if refused := refused_pickle(error):
            reason = f"holds pickled code, refused: {refused}"
        elif "state_dict" in text:  # a real state dict of another architecture: say what does not fit
            reason = " ".join(text.split())[:200]
        else:
            reason = "not a PyTorch or safetensors weights file"
        raise WeightsUnavailableError(
            f"--weights {path} cannot be loaded as weights of {name} ({reason}); pass a .pth or "
            ".safetensors state dict of that architecture (tensors only: pickled code is refused)"
        ) from None


def _fit_input_size(model: nn.Module, image_size: int) -> None:
    """Models with position embeddings (ViT, Swin) take one input size, fixed when built; a CNN
    takes any. Their embeddings are resampled to ``image_size``, and the size travels with the
    saved model (``img_size`` in its model_args) so that timm rebuilds the same shapes."""
    patch_embed = getattr(model, "patch_embed", None)
    if not hasattr(model, "set_input_size") or getattr(patch_embed, "img_size", None) in (None, (image_size, image_size)):
        return
    model.set_input_size(img_size=(image_size, image_size))
    architecture_args = {**model.pretrained_cfg.get("architecture_args", {}), "img_size": image_size}
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture_args": architecture_args}


def classifier_path(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier", "classifier")


def create_head(num_features: int, num_classes: int, hidden_size: int = 0, drop_rate: float = 0.0) -> nn.Module:
    """The classifier on pooled features: one linear layer, or with ``hidden_size`` a hidden dense
    layer (linear, ReLU, dropout, linear). The dropout before it is timm's own (``drop_rate``)."""
    if not hidden_size:
        return nn.Linear(num_features, num_classes)
    return nn.Sequential(
        nn.Linear(num_features, hidden_size),
        nn.ReLU(inplace=True),
        nn.Dropout(drop_rate),
        nn.Linear(hidden_size, num_classes),
    )


def replace_classifier(model: nn.Module, head: nn.Module) -> None:
    """Put ``head`` where ``get_classifier()`` finds it; timm's ``reset_classifier`` makes only linear heads."""
    parent, _, attribute = classifier_path(model).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, head)


def forward_pooled(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled (pre-logits) features: exactly what the classifier sees, dropout aside. timm's
    ``forward_features`` is the map before pooling."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def classify_pooled(model: nn.Module, pooled: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """Logits of pooled features: the dropout and classifier that ``forward_head`` applies after
    ``pre_logits``, in the classifier's own train or eval mode."""
    classifier = model.get_classifier()
    return classifier(F.dropout(pooled, drop_rate, classifier.training))


class PooledFeatures(nn.Module):
    """The backbone up to the pooled features, as one module for export and caching."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return forward_pooled(self.model, images)
