"""bf16 mixed precision on a CPU with bf16 instructions, trained depthwise convolutions kept in
float32 (timings: benchmarks/RESULTS.md); weights and optimizer state stay float32."""

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
    own or its input needs a gradient) while a fit on the CPU is in bf16 mixed precision, whose
    depthwise backward is slower than float32's; the model is handed back as it was found when
    the fit ends, or fails."""

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
    """Whether this CPU has bf16 instructions (AMX or AVX512-BF16), on which bf16 fine-tuning was
    faster than float32 wherever measured."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: float32 there
    found = capabilities() if capabilities else {}
    return bool(found.get("amx_bf16") or found.get("avx512_bf16"))
