"""How long a train will take, said before it starts: the images, the passes the config makes over
them, and each pass's seconds per image, calibrated on 2 cores for the embedded backbones and, for
any other, scaled by its forward against the default backbone's, measured here back to back."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transferkit.config import DEFAULT_MODEL, TrainConfig, parse_unfreeze
from transferkit.data.loaders import resolve_preprocessing
from transferkit.models.create import create_classifier
from transferkit.models.freeze import backbone_blocks, count_unfrozen
from transferkit.training.phase import epoch_log
from transferkit.training.presets import AUTO, DEFAULT_PRESET, PRESETS, format_minutes, parse_duration
from transferkit.training.trainer_options import process_rank

log = logging.getLogger(__name__)

CHOSEN_PRESET_ENV = "TRANSFERKIT_CHOSEN_PRESET"
"""The preset ``auto`` chose on rank zero: every process of a multi-process run must train the same
recipe, and each estimate reads its own process's clock."""

# Seconds per image on a 2-core Xeon (the cache pass: decoded, through the backbone on ONNX Runtime,
# features and activations written; one image through one unfrozen block for one epoch of fine-tuning
# on cached activations, val included), fitted on benchmarks/presets.json's least loaded `balanced`
# runs (tf_flowers seed 42, hymenoptera seed 2: fit_seconds and train_seconds); Lite2 at Lite0's times
# the ratios measured on hymenoptera seed 1 (2.4x, 1.2x); Lite1 between, not measured. The same
# commands ran up to 4x as long while the machine was shared with other work.
CALIBRATED = {
    "tf_efficientnet_lite0": (0.0113, 0.00112),
    "tf_efficientnet_lite1": (0.019, 0.00123),
    "tf_efficientnet_lite2": (0.027, 0.00134),
}
EPOCH_SECONDS = 5.0
"""A fine-tuning epoch's seconds whatever its images: Lightning's loops, validation set-up, checkpoints."""
IMAGE_EPOCH = 1.5
"""Fine-tuning on images, per image and epoch, in cache passes (a decode, a forward, a backward of the top)."""
OVERHEAD_SECONDS = 12.0
"""The imports, the model, the index, the head phase, calibration and the saved folder."""
MEASURED_IMAGES = 8


@dataclass(frozen=True)
class Estimate:
    """A run's duration as it is planned, in seconds, and what it rests on."""

    seconds: float
    cache_seconds: float
    """One image's cache pass, calibrated or scaled from the default backbone's."""
    preset: str
    images: int
    trained_blocks: int
    blocks: int
    views: int


def forward_seconds(model: nn.Module, input_size: tuple[int, ...]) -> float:
    """Seconds per image of one no-grad forward of ``model``, the faster of two batches (the first
    pays for allocation); the model's modes are left as they were."""
    training = model.training
    model.eval()
    batch = torch.randn(MEASURED_IMAGES, *input_size)
    best = float("inf")
    with torch.no_grad():
        for _ in range(2):
            started = time.perf_counter()
            model(batch)
            best = min(best, time.perf_counter() - started)
    model.train(training)
    return best / MEASURED_IMAGES


def pass_seconds(name: str, model: nn.Module, input_size: tuple[int, ...], blocks: int) -> tuple[float, float]:
    """(cache pass, block-epoch) seconds per image for backbone ``name``: calibrated, or the default
    backbone's scaled by the two forwards measured now (the same load slows both)."""
    if name in CALIBRATED:
        return CALIBRATED[name]
    import timm

    reference = timm.create_model(DEFAULT_MODEL, pretrained=False, num_classes=2)
    scale = forward_seconds(model, input_size) / forward_seconds(reference, (3, 256, 256))
    cache, block_epoch = CALIBRATED[DEFAULT_MODEL]
    return cache * scale, block_epoch * scale * len(backbone_blocks(reference)) / max(blocks, 1)


def estimate_run(
    config: TrainConfig, model: nn.Module, preprocessing: dict[str, Any], counts: dict[str, int],
) -> Estimate:
    """The seconds ``config`` takes on ``model`` with ``counts`` images per split, where no
    feature is cached yet (a cached run is quicker)."""
    train, val = counts.get("train", 0), counts.get("val", 0)
    images = sum(counts.values())
    blocks = len(backbone_blocks(model))
    cache, block_epoch = pass_seconds(config.model.name, model, preprocessing["input_size"], blocks)
    epochs = config.finetune.epochs
    trained = count_unfrozen(blocks, parse_unfreeze(config.finetune.unfreeze, train)) if epochs else 0
    on_images = config.finetune_on == "images" or trained >= blocks
    views = 0 if on_images or not epochs else min(config.finetune_views, max(epochs - 1, 0))
    seconds = OVERHEAD_SECONDS + cache * (images + views * train + images - train)
    if on_images:
        seconds += epochs * (EPOCH_SECONDS + IMAGE_EPOCH * cache * (train + val))
    else:
        seconds += epochs * (EPOCH_SECONDS + trained * block_epoch * (train + val))
    if not config.feature_cache or config.frozen.augment != "none":  # the head trains on images
        seconds += config.frozen.epochs * (EPOCH_SECONDS + IMAGE_EPOCH * cache * (train + val))
    return Estimate(seconds, cache, config.preset, images, trained, blocks, views)


def describe(estimate: Estimate) -> str:
    """The console's line before training."""
    tuned = (f"fine-tuning {estimate.trained_blocks} of {estimate.blocks} blocks"
             + (f" on {estimate.views} cached views" if estimate.views else "")) if estimate.trained_blocks else "the head alone"
    return (f"estimated time: {format_minutes(estimate.seconds)} (preset {estimate.preset}: {estimate.images:,} "
            f"images, {tuned}; {estimate.cache_seconds * 1000:.0f} ms an image through the backbone, as measured on "
            "2 cores; less where the features are cached)")


def resolve_preset(
    config: TrainConfig, counts: dict[str, int], num_classes: int, seconds_spent: float
) -> tuple[TrainConfig, dict[str, Estimate]]:
    """``config`` with ``--preset auto`` resolved: the most accurate preset whose estimate fits
    what ``seconds_spent`` left of ``--time-limit`` (``fast`` where none does, or without a
    limit), said in one line; and the estimates made, by preset."""
    if config.preset != AUTO:
        return config, {}
    if not config.time_limit:
        return config.with_options({"preset": DEFAULT_PRESET}), {}
    if process_rank() != 0 and os.environ.get(CHOSEN_PRESET_ENV):  # rank zero's choice, not this clock's
        return config.with_options({"preset": os.environ[CHOSEN_PRESET_ENV]}), {}
    left = parse_duration(config.time_limit) - seconds_spent
    estimates: dict[str, Estimate] = {}
    chosen = config.with_options({"preset": DEFAULT_PRESET})
    for name in reversed(list(PRESETS)):  # the most accurate first
        candidate = config.with_options({"preset": name})
        model = create_classifier(candidate.model, num_classes, candidate.data.image_size)
        estimates[name] = estimate_run(candidate, model, resolve_preprocessing(model, candidate.data.image_size), counts)
        if estimates[name].seconds <= left:
            chosen = candidate
            break
    os.environ[CHOSEN_PRESET_ENV] = chosen.preset  # for the processes Lightning launches
    said = ", ".join(f"{name} {format_minutes(estimate.seconds)}" for name, estimate in estimates.items())
    epoch_log.info("--time-limit %s: preset %s (%s)%s", config.time_limit, chosen.preset, said,
                   "" if estimates[chosen.preset].seconds <= left else "; none fits, so phases stop at the limit")
    return chosen, estimates
