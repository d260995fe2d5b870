"""Where a classifier splits into a fixed bottom and a trained top, and the forwards of each part."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transferkit.models.freeze import backbone_blocks, count_unfrozen


def layer_sequence(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``model.forward_features`` as named layers run one after another, or None for a family
    whose ``forward_features`` is not that."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    def blocks(prefix: str, stages: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{prefix}.{i}.{j}", block) for i, stage in enumerate(stages) for j, block in enumerate(stage)]

    if isinstance(model, EfficientNet):
        return [("conv_stem", model.conv_stem), ("bn1", model.bn1), *blocks("blocks", model.blocks),
                ("conv_head", model.conv_head), ("bn2", model.bn2)]
    if isinstance(model, ResNet):
        layers = [(f"layer{k}", getattr(model, f"layer{k}")) for k in range(1, 5)]
        return [("conv1", model.conv1), ("bn1", model.bn1), ("act1", model.act1), ("maxpool", model.maxpool),
                *((f"{name}.{j}", block) for name, stage in layers for j, block in enumerate(stage))]
    return None


def boundary_index(model: nn.Module, unfreeze: int | float | None) -> int | None:
    """The position in ``layer_sequence`` where the layers that train for ``unfreeze`` begin;
    None when no bottom stays fixed (every block trains) or the family has no layer sequence."""
    sequence = layer_sequence(model)
    if sequence is None:
        return None
    blocks = backbone_blocks(model)
    count = count_unfrozen(len(blocks), unfreeze)
    if count == 0:
        return len(sequence)
    if count >= len(blocks):
        return None
    first_trained = blocks[len(blocks) - count][0]
    start = next((i for i, (name, _) in enumerate(sequence) if first_trained.startswith(name + ".")), None)
    if start is None:
        return None
    # The top must hold exactly the blocks that train: a parameter of theirs below the boundary
    # would be cached instead of trained.
    trained = {name for block in blocks[len(blocks) - count :] for name in block}
    top = {f"{name}.{p}" for name, layer in sequence[start:] for p, _ in layer.named_parameters()}
    return start if trained <= top | _head_parameters(model) and top <= trained else None


def _head_parameters(model: nn.Module) -> set[str]:
    """Parameters outside the layer sequence that train with the top: the classifier and the
    norm timm applies to pooled features."""
    sequence = layer_sequence(model) or []
    inside = {f"{name}.{p}" for name, layer in sequence for p, _ in layer.named_parameters()}
    return {name for name, _ in model.named_parameters() if name not in inside}


def forward_bottom(model: nn.Module, images: torch.Tensor, boundary: int) -> torch.Tensor:
    """The boundary activations of ``images``."""
    x = images
    for _, layer in (layer_sequence(model) or [])[:boundary]:
        x = layer(x)
    return x


def forward_top(model: nn.Module, activations: torch.Tensor, boundary: int, pre_logits: bool = False) -> torch.Tensor:
    """Logits (or pooled features) from boundary activations: the rest of ``forward_features``,
    then timm's ``forward_head``."""
    x = activations
    for _, layer in (layer_sequence(model) or [])[boundary:]:
        x = layer(x)
    return forward_head(model, x, pre_logits)


def forward_head(model: nn.Module, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """timm's ``forward_head`` on channels-last feature maps, with their gradient handed back
    channels-last too: pooling's backward yields a broadcast gradient, on which the last batch
    norm's backward is several times slower on CPU (benchmarks/RESULTS.md, "Measurements behind defaults")."""
    if features.requires_grad and features.dim() == 4 and features.is_contiguous(memory_format=torch.channels_last):
        features = _ChannelsLastGradient.apply(features)
    return model.forward_head(features, pre_logits=pre_logits)


class _ChannelsLastGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, features: torch.Tensor) -> torch.Tensor:
        return features.view_as(features)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        return gradient.contiguous(memory_format=torch.channels_last)


def activation_bytes(model: nn.Module, boundary: int, input_size: tuple[int, ...]) -> int:
    """The size of one image's cached activations at ``boundary`` (float16)."""
    with torch.inference_mode():
        shape = forward_bottom(model.eval(), torch.zeros(1, *input_size), boundary).shape
    return 2 * int(torch.Size(shape[1:]).numel())


class Bottom(nn.Module):
    """The layers below the boundary as one module, for export and caching."""

    def __init__(self, model: nn.Module, boundary: int):
        super().__init__()
        self.layers = nn.Sequential(*(layer for _, layer in (layer_sequence(model) or [])[:boundary]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class BottomAndPooled(nn.Module):
    """The boundary activations and the pooled features, from one pass of the backbone: the
    frozen phase's features come from the float32 activations before they are cached in float16,
    so they are the backbone's own features of the image."""

    output_names = ("activations", "features")

    def __init__(self, model: nn.Module, boundary: int):
        super().__init__()
        self.model = model
        self.boundary = boundary

    def extra_repr(self) -> str:  # in the printed tree, so the ONNX export cache tells boundaries apart
        return f"boundary={self.boundary}"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        below = forward_bottom(self.model, images, self.boundary)
        return below, forward_top(self.model, below, self.boundary, pre_logits=True)
