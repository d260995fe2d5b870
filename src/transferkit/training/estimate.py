"""How long a train will take on this machine, said before it starts: the images, the passes the
config makes over them, and the backbone's speed measured here on a few batches."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transferkit.config import TrainConfig, parse_unfreeze
from transferkit.data.loaders import resolve_preprocessing
from transferkit.models.create import create_classifier
from transferkit.models.freeze import backbone_blocks, count_unfrozen
from transferkit.training.phase import epoch_log
from transferkit.training.presets import AUTO, DEFAULT_PRESET, PRESETS, format_minutes, parse_duration

log = logging.getLogger(__name__)

# Each pass's cost in eager no-grad forwards of the whole backbone per image, fitted on this
# project's 2-core runs (benchmarks/RESULTS.md, "Quality presets"): the cache pass runs on ONNX
# Runtime and decodes JPEGs; a training step is a forward and a backward through the unfrozen top.
CACHE_PASS = 0.45
TRAINING_STEP = 3.0
IMAGE_TRAINING_STEP = 2.2
EVALUATION = 1.0
OVERHEAD_SECONDS = 12.0
"""The model, the index, the head phase, calibration and the saved folder: seconds whatever the data."""
MEASURED_IMAGES = 8


@dataclass(frozen=True)
class Estimate:
    """A run's duration as it is planned, in seconds, and what it rests on."""

    seconds: float
    seconds_per_image: float
    """One eager forward of the whole backbone, measured here."""
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


def estimate_run(
    config: TrainConfig, model: nn.Module, preprocessing: dict[str, Any], counts: dict[str, int],
    seconds_per_image: float | None = None,
) -> Estimate:
    """The seconds ``config`` takes on ``model`` with ``counts`` images per split, where no
    feature is cached yet (a cached run is quicker); ``seconds_per_image`` is measured where not given."""
    per_image = seconds_per_image or forward_seconds(model, preprocessing["input_size"])
    train, val = counts.get("train", 0), counts.get("val", 0)
    images = sum(counts.values())
    blocks = len(backbone_blocks(model))
    epochs = config.finetune.epochs
    trained = count_unfrozen(blocks, parse_unfreeze(config.finetune.unfreeze, train)) if epochs else 0
    on_images = config.finetune_on == "images" or trained >= blocks
    views = 0 if on_images or not epochs else min(config.finetune_views, max(epochs - 1, 0))
    share = trained / max(blocks, 1)
    passes = CACHE_PASS * (images + views * train) + EVALUATION * (images - train)
    if on_images:
        passes += epochs * (IMAGE_TRAINING_STEP * (1 + share) * train + EVALUATION * val)
    else:
        passes += epochs * share * (TRAINING_STEP * train + val)
    if not config.feature_cache or config.frozen.augment != "none":  # the head trains on images
        passes += config.frozen.epochs * (IMAGE_TRAINING_STEP * train + EVALUATION * val)
    return Estimate(OVERHEAD_SECONDS + passes * per_image, per_image, config.preset, images, trained, blocks, views)


def describe(estimate: Estimate) -> str:
    """The console's line before training."""
    tuned = (f"fine-tuning {estimate.trained_blocks} of {estimate.blocks} blocks"
             + (f" on {estimate.views} cached views" if estimate.views else "")) if estimate.trained_blocks else "the head alone"
    return (f"estimated time: {format_minutes(estimate.seconds)} on this machine (preset {estimate.preset}: "
            f"{estimate.images:,} images, {tuned}, {estimate.seconds_per_image * 1000:.0f} ms an image "
            "measured; less where the features are cached)")


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
    said = ", ".join(f"{name} {format_minutes(estimate.seconds)}" for name, estimate in estimates.items())
    epoch_log.info("--time-limit %s: preset %s (%s)%s", config.time_limit, chosen.preset, said,
                   "" if estimates[chosen.preset].seconds <= left else "; none fits, so phases stop at the limit")
    return chosen, estimates
