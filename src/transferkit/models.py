"""Backbones from timm, the classification head, freezing and parameter groups. No Lightning here.

The classifier is a plain timm model whose own head (global pool, dropout, classifier) is reset
for the new classes, so the saved model folder is a timm local-dir that
``timm.create_model("local-dir:...", pretrained=True)`` rebuilds anywhere. A hidden dense layer
(``hidden_size``) is the one head timm cannot describe; ``create_head`` builds it for both
``create_classifier`` and ``load_model``.

timm's names keep timm's meanings: ``forward_features`` is the unpooled map, pooled features are
``forward_pooled`` (``forward_head(..., pre_logits=True)``), and the classifier is
``get_classifier()``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from transferkit._io import atomic_write, write_json
from transferkit.config import ModelConfig
from transferkit.errors import ConfigError, RunFolderError, WeightsUnavailableError, close_matches, refused_pickle
from transferkit.weights import (
    EMBEDDED_TEST_INPUT_SIZE, create_from_hub, embedded_weights_file, load_embedded_state_dict,
)

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1


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
        folder = Path(weights[len("local-dir:") :]).expanduser()
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
    elif weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"weights file {path} not found; pass --weights with a .pth/.safetensors state dict, "
                "--weights local-dir:FOLDER, or --weights none to train from scratch"
            )
        try:
            model = timm.create_model(
                config.name,
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
                f"--weights {path} cannot be loaded as weights of {config.name} ({reason}); pass a .pth or "
                ".safetensors state dict of that architecture (tensors only: pickled code is refused)"
            ) from None
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
        _replace_classifier(model, create_head(model.num_features, num_classes, config.hidden_size, config.drop_rate))
    return model


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


def _replace_classifier(model: nn.Module, head: nn.Module) -> None:
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


# --- freezing ------------------------------------------------------------------------------


def backbone_blocks(model: nn.Module) -> list[list[str]]:
    """Parameter names of each backbone block, bottom (stem) to top, without the head.

    Blocks are timm's fine-grained ``group_matcher`` groups: for EfficientNet the stem and each
    stage (the last one carries conv_head), for ResNet each residual block, for ViT each
    transformer block, for ConvNeXt each block (a stage's downsampling goes with its first).
    """
    from timm.models._manipulate import group_parameters

    head_names = {f"{classifier_path(model)}.{n}" for n, _ in model.get_classifier().named_parameters()}
    groups = group_parameters(model, model.group_matcher(coarse=False))
    blocks: list[list[str]] = []
    for _, names in sorted(groups.items()):
        backbone = [n for n in names if n not in head_names]
        if backbone and len(backbone) < len(names) and blocks:
            # The classifier's group also holds the norm timm applies to the pooled features
            # (ConvNeXt's head.norm, ViT's fc_norm): not a block of its own, it trains with the top one.
            blocks[-1].extend(backbone)
        elif backbone:
            blocks.append(backbone)
    return blocks


def freeze_backbone(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad = False
    for parameter in model.get_classifier().parameters():
        parameter.requires_grad = True


def unfreeze_top(model: nn.Module, spec: int | float | None) -> int:
    """Freeze the backbone, then unfreeze its top blocks: N blocks, a fraction, or all (None).

    Returns the number of blocks that train.
    """
    blocks = backbone_blocks(model)
    count = count_unfrozen(len(blocks), spec)
    freeze_backbone(model)
    trainable = {name for block in blocks[len(blocks) - count :] for name in block}
    for name, parameter in model.named_parameters():
        if name in trainable:
            parameter.requires_grad = True
    return count


def count_unfrozen(blocks: int, spec: int | float | None) -> int:
    """How many of ``blocks`` backbone blocks train for an unfreeze ``spec`` (N, a fraction, None: all)."""
    if spec is None:
        return blocks
    if isinstance(spec, float):
        return max(1, round(blocks * spec))
    return min(spec, blocks)


def set_batchnorm_mode(model: nn.Module, policy: str) -> None:
    """Put every batch norm in the mode the policy says; call it before each training step.

    'frozen': every batch norm stays in inference mode and keeps its ImageNet statistics; small
    fine-tuning batches estimate them worse, and some weights (TensorFlow's MobileNetV2) have
    batch norm folded into the convolutions, which batch statistics would undo. Its affine
    parameters still train where their block is unfrozen.
    'train': batch norms in unfrozen blocks update their statistics; frozen blocks never do.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            trains = any(p.requires_grad for p in module.parameters(recurse=False))
            module.train(policy == "train" and trains)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, head_lr_multiplier: float = 1.0
) -> list[dict[str, Any]]:
    """Trainable parameters only, split into head / backbone and decay / no decay.

    Norms and biases (1-D tensors) get no weight decay, as in timm's own optimizer factory. While
    backbone blocks train, the head's groups carry ``lr_scale = head_lr_multiplier`` (timm's key
    for a group's multiple of the scheduled rate): fastai's discriminative rates, a new head
    learning faster than the pretrained layers under it. Alone, the head trains at ``lr``.
    """
    head_prefix = classifier_path(model) + "."
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "head" if name.startswith(head_prefix) else "backbone"
        decay = parameter.ndim > 1
        groups.setdefault((part, decay), []).append(parameter)
    backbone_trains = any(part == "backbone" for part, _ in groups)
    result = []
    for (part, decay), params in sorted(groups.items()):
        scale = head_lr_multiplier if part == "head" and backbone_trains else 1.0
        result.append({
            "name": f"{part}{'' if decay else '_no_decay'}", "params": params, "lr": lr * scale, "lr_scale": scale,
            "weight_decay": weight_decay if decay else 0.0,
        })
    return result


# --- the saved model folder --------------------------------------------------------------------


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
        _replace_classifier(model, head)
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except (RuntimeError, OSError, SafetensorError) as error:
        reason = " ".join(str(error).split())[:240]  # PyTorch's first line only says "Error(s) in loading"
        raise RunFolderError(
            f"{folder / 'model.safetensors'} does not fit the model config.json describes ({reason}); "
            "train or export the model again"
        ) from None
    return model.eval(), config
