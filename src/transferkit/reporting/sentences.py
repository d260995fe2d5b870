"""The report's plain sentences: the headline, what the reliability diagram says, how far the
"none of these" threshold can be trusted, and which split a run really used."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

MODEL_NAMES = {
    "tf_efficientnet_lite0": "EfficientNet-Lite0", "tf_efficientnet_lite1": "EfficientNet-Lite1",
    "tf_efficientnet_lite2": "EfficientNet-Lite2", "resnet18": "ResNet-18", "resnet50": "ResNet-50",
    "convnext_tiny": "ConvNeXt-T", "vit_small_patch16_224": "ViT-S/16",
}
"""timm names a reader knows by another spelling; any other name is shown as timm spells it."""

SPLIT_WORDS = {"val": "validation", "test": "test", "train": "training"}

ABOVE_THRESHOLD = 5
"""Validation images that must score above the unknown threshold for it to be trusted: with
fewer, the threshold is one or two images' scores, and the share of real images it turns away
can be double or half the share asked for."""


def model_name(name: str) -> str:
    return MODEL_NAMES.get(name, name)


def class_phrase(classes: list[str]) -> str:
    """"ants vs bees", "daisy, roses and tulips", "37 classes (Abyssinian, Bengal, …)"."""
    if len(classes) == 2:
        return f"{classes[0]} vs {classes[1]}"
    if len(classes) <= 5:
        return ", ".join(classes[:-1]) + f" and {classes[-1]}"
    return f"{len(classes)} classes ({', '.join(classes[:3])}, …)"


def headline(classes: list[str], model: str, metrics: dict[str, Any], split: str, date: str | None) -> str:
    """``ants vs bees, EfficientNet-Lite0, 96.1% on 153 validation images (trained 2026-12-07)``."""
    accuracy = metrics.get("accuracy")
    score = f"{accuracy:.1%} on {metrics.get('images', 0):,} {SPLIT_WORDS.get(split, split)} images" \
        if accuracy is not None else f"not yet judged on the {split} split"
    return f"{class_phrase(classes)}, {model_name(model)}, {score}" + (f" (trained {date})" if date else "")


def reliability_sentence(predictions: list[dict[str, Any]], sure: float = 0.9) -> str:
    """What the reliability diagram says, for a reader who is not a statistician."""
    text = ("Each bar gathers the images the model was about equally sure of; its height is how often "
            "it was right about them. Bars on the dashed line mean that when the model says 80%, it is "
            "right 80% of the time; bars below it mean it is surer of itself than it should be.")
    confident = [r for r in predictions if float(r["confidence"]) >= sure]
    if confident:
        right = sum(r["label"] == r["predicted"] for r in confident)
        text += (f" Here, of the {len(confident):,} images it was at least {sure:.0%} sure of, "
                 f"it got {right:,} right ({right / len(confident):.0%}).")
    return text


UNKNOWN_BADGE = "answered unknown"


def answered_unknown(row: dict[str, Any]) -> bool:
    """Whether an image was answered "none of these": a bool in metrics.json, true/false/empty in predictions.csv."""
    return str(row.get("unknown", "")).lower() == "true"


def abstention_sentence(rows: list[dict[str, Any]]) -> str:
    """What the "answered unknown" badge on a grid's pictures means; empty when none is badged."""
    badged = sum(answered_unknown(row) for row in rows)
    if not badged:
        return ""
    return (f'{badged} of these {len(rows)} images are badged "{UNKNOWN_BADGE}": their unknown score is above the '
            '"none of these" threshold, so a user of the model is told "none of these" instead of the class shown.')


def images_needed(keep: float) -> int:
    """Validation images for ``ABOVE_THRESHOLD`` of them to lie above a threshold that keeps ``keep``."""
    return math.ceil(ABOVE_THRESHOLD / max(1 - keep, 1e-9) - 1e-9)


def threshold_note(record: dict[str, Any] | None) -> tuple[str, bool]:
    """(How many images the unknown threshold rests on, whether that is too few to trust)."""
    if not record:
        return "", False
    images, keep = int(record["images"]), float(record["keep"])
    split = SPLIT_WORDS.get(record.get("fitted_on", "val"), record.get("fitted_on", "val"))
    needed = images_needed(keep)
    text = (f'The "none of these" threshold rests on {images:,} {split} images: it is set so that '
            f"{keep:.0%} of them stay below it.")
    if images >= needed:
        return text, False
    return (text + f" That is too few to trust: at least {needed:,} are needed for {ABOVE_THRESHOLD} of "
            f"them to lie above it, so it may turn away far more, or far fewer, real images than "
            f"{1 - keep:.0%}. Add validation images, or treat its answers as a hint."), True


def split_used(config: dict[str, Any], split_paths: dict[str, list[str]]) -> str:
    """What ``data.split`` really was for this run: the folder's own split folders, an earlier
    run's split, or the fractions carved."""
    data = config.get("data") or {}
    if data.get("splits_from"):
        return f"the split of the earlier run {data['splits_from']} (--split not used)"
    source = data.get("source")
    if source and split_paths and all(_under(path, source, split) for split, paths in split_paths.items()
                                      for path in paths):
        return "the folder's own " + " and ".join(f"{name}/" for name in split_paths) + " folders (--split not used)"
    fractions = data.get("split") or []
    return "carved at random: " + ", ".join(f"{f:.0%} {name}" for f, name in zip(fractions, ("train", "val", "test")))


def _under(path: str, source: str, split: str) -> bool:
    relative = os.path.relpath(path, source)
    return Path(relative).parts[:1] == (split,)
