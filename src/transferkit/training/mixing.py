"""Mixup and CutMix on fine-tuning's training batches: timm's ``Mixup``, its soft targets and
``SoftTargetCrossEntropy``. On images both apply; on cached activations only mixup, which mixes
the maps the unfrozen blocks read as it mixes pixels (manifold mixup, Verma et al. 2019); a
CutMix box on an 8x8 map would cut whole objects, so it is not offered there."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class Mixing:
    """``(inputs, targets)`` of a training batch mixed (each with the batch in reverse order, as
    timm pairs them), with the mixed soft targets, label smoothing folded in; ``loss`` reads them."""

    def __init__(self, mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                         num_classes=num_classes)
        self.loss: nn.Module = SoftTargetCrossEntropy()
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        # timm mixes pairs and needs an even count: an odd batch's last sample trains unmixed.
        even = len(inputs) - len(inputs) % 2
        inputs = inputs.float()  # cached activations are float16; timm mixes in place
        whole = mixup_target(targets, self.num_classes, 1.0, self.label_smoothing)
        if even == 0:
            return inputs, whole
        mixed, soft = self.mix(inputs[:even].clone(), targets[:even])
        return torch.cat([mixed, inputs[even:]]), torch.cat([soft, whole[even:]])


def create_mixing(
    mixup: float, cutmix: float, label_smoothing: float, num_classes: int, on_images: bool
) -> Mixing | None:
    """The mixing of fine-tuning's batches (``--finetune-mixup``, ``--finetune-cutmix``), or None
    where it mixes nothing: CutMix only on images."""
    if cutmix > 0 and not on_images:
        # A warning: the user asked for CutMix, and --finetune-on auto chose activations for them.
        log.warning("--finetune-cutmix is not used: fine-tuning reads cached activations here, where only "
                    "--finetune-mixup applies; add --finetune-on images to cut images")
        cutmix = 0.0
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixing(mixup, cutmix, label_smoothing, num_classes)
