"""'Same' padding fixed for the one input size an exported file takes.

timm's ``Conv2dSame`` (the ``tf_`` models, EfficientNet-Lite among them) works its padding out
from each input's height and width, so the exported graph computes it at every call: shape
arithmetic, a Pad between two layout transposes before each strided convolution, and the
quantiser's int8 rounding on that arithmetic. The file's input size is fixed, so the padding is
too: as constants, which the ONNX export's simplification (``inference.onnx_runtime.simplified``) fuses
into each convolution's own pads. Every ONNX export is fixed so (``inference.onnx_runtime.export_onnx``):
onnxslim folds the per-call arithmetic wrongly where a map's side is odd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FixedPadConv2d(nn.Module):
    """A ``Conv2dSame`` whose padding (left, right, top, bottom) was computed once."""

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]):
        super().__init__()
        self.conv = conv
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return F.conv2d(F.pad(x, self.pads), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def fix_same_padding(module: nn.Module, input_size: tuple[int, ...]) -> nn.Module:
    """``module`` (changed in place) with every ``Conv2dSame`` padding as it does for one
    ``input_size`` (C, H, W) image; the same outputs for that size, and only for it. Convolutions
    fixed before are left as they are."""
    from timm.layers import Conv2dSame
    from timm.layers.padding import get_same_padding

    fixed = {f"{name}.conv" for name, child in module.named_modules() if isinstance(child, FixedPadConv2d)}
    convs = {name: child for name, child in module.named_modules() if isinstance(child, Conv2dSame) and name not in fixed}
    if not convs:
        return module
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [child.register_forward_pre_hook(lambda _, inputs, name=name: sizes.__setitem__(name, inputs[0].shape[-2:]))
             for name, child in convs.items()]
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, conv in convs.items():
        (height, width), (kh, kw) = sizes[name], conv.weight.shape[-2:]
        pad_h = get_same_padding(height, kh, conv.stride[0], conv.dilation[0])
        pad_w = get_same_padding(width, kw, conv.stride[1], conv.dilation[1])
        module.set_submodule(name, FixedPadConv2d(conv, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))
    return module
