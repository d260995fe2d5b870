"""bf16 mixed precision for fine-tuning on a CPU that computes in bf16 natively.

On a CPU with AMX (Intel Sapphire Rapids and later), oneDNN runs bf16 convolutions on its matrix
units; with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake), on bf16 dot-product
instructions. On an AMD EPYC with AVX512-BF16 and no AMX (2 cores), the default fine-tuning took
3.2 s in bf16 against 4.7 s in float32 on hymenoptera and 33.5 against 50.6 s on tf_flowers
(means over 3 seeds, benchmarks/RESULTS.md), and on images 19.8-21.0 s against 36.5-38.8 s
(hymenoptera, seed 42), at the same validation accuracy. On the AMX machine, one fine-tuning
step of EfficientNet-Lite0's top three blocks on cached activations (batch 32, 192 x 8 x 8; 2
cores) took 179 ms in float32 and 104 ms in bf16 mixed precision with ``DepthwiseInFloat32``,
204 ms without it: in bf16, the backward of the three 5 x 5 depthwise convolutions alone took
179 ms of the step, against 35 ms in float32. Their forward is fast in bf16, so only a depthwise
convolution that a backward will run through leaves autocast (on the AMD machine that made no
difference: 106 ms a step, 104-115 in plain bf16). Weights and optimizer state stay float32, as
with Lightning's 'bf16-mixed' on a GPU; Lightning runs each epoch's validation under the same
autocast.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from torch import nn

log = logging.getLogger(__name__)


class DepthwiseInFloat32(L.Callback):
    """Runs a depthwise convolution in float32 where its backward will run (a parameter of its
    own or its input needs a gradient) while a fit on the CPU is in bf16 mixed precision; the model is
    handed back as it was found when the fit ends, or fails."""

    def __init__(self) -> None:
        self._wrapped: list[tuple[nn.Module, _Float32Forward]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(trainer.accelerator, CPUAccelerator) or trainer.precision != "bf16-mixed":
            return
        log.info("bf16 mixed precision on the CPU, trained depthwise convolutions in float32 (--precision 32-true: "
                 "float32)")
        for module in pl_module.modules():
            if _is_depthwise(module):
                wrapper = _Float32Forward(module)
                module.forward = wrapper  # type: ignore[method-assign]
                self._wrapped.append((module, wrapper))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for module, wrapper in self._wrapped:
            if vars(module).get("forward") is wrapper:
                del module.forward
        self._wrapped.clear()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning calls teardown only when a fit ends normally.
        self.teardown(trainer, pl_module, "fit")


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


class _Float32Forward:
    def __init__(self, conv: nn.Module):
        self.conv = conv
        self.forward = conv.forward

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        trains = any(p.requires_grad for p in self.conv.parameters(recurse=False))
        if not (torch.is_grad_enabled() and (x.requires_grad or trains)):
            return self.forward(x, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return self.forward(x.float(), *args, **kwargs)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions: AMX, where a bf16 fine-tuning step measured 1.7x
    as fast as float32, or AVX512-BF16, where fine-tuning on an AMD EPYC was 1.47x and 1.51x as
    fast on activations (hymenoptera, tf_flowers) and 1.85x on images (and as fast as float32
    on the AMX machine with oneDNN limited to AVX512-BF16, so never slower where measured)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: float32 there
    found = capabilities() if capabilities else {}
    return bool(found.get("amx_bf16") or found.get("avx512_bf16"))
