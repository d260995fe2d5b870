"""Freezing: which blocks train, how frozen batch norm behaves, and the optimizer's parameter groups."""

from __future__ import annotations

from typing import Any

from torch import nn

from transferkit.models.create import classifier_path


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
