"""Every augmentation: the presets on images, the seeded views cached for fine-tuning, and augmentation in activation space."""

from __future__ import annotations

import functools
import math
import random as pyrandom
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from transferkit.data.config import VIEW_POLICIES
from transferkit.data.images import RESAMPLING, normalize_image, preprocess_image

if TYPE_CHECKING:
    import torch

def augment(batch: torch.Tensor, strength: str) -> torch.Tensor:
    """Augmentation that survives caching, in activation space: 'light' mirrors half the maps
    left to right (the map of a mirrored image is close to the mirrored map); 'strong' also
    shifts each map by up to one cell, edges repeated (for EfficientNet-Lite0 at 256 px, a cell
    is 32 pixels of the image with three blocks unfrozen, 16 with six)."""
    if strength == "none":
        return batch
    flip = torch.rand(len(batch), device=batch.device) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    if strength == "strong":
        height, width = batch.shape[-2:]
        padded = torch.nn.functional.pad(batch.float(), (1, 1, 1, 1), mode="replicate").to(batch.dtype)
        shifts = torch.randint(0, 3, (len(batch), 2))
        batch = torch.stack([
            padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(shifts.tolist())
        ])
    return batch


LIGHT_CROP_SCALE = (0.5, 1.0)
"""The ``light`` preset's random-resized crop: the share of the image's area it keeps."""


CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect ratios of the random-resized crops (torchvision's default)."""


def create_transform(preprocessing: dict[str, Any], augment: str = "none") -> Any:
    """The image-to-tensor transform: the eval preprocessing, or it behind random crops and flips
    (``light``) and rotation and colour jitter as well (``strong``)."""
    if augment == "none":
        # A partial of a module-level function pickles, so spawned DataLoader workers can take it.
        return functools.partial(preprocess_to_tensor, preprocessing=preprocessing)
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    size = preprocessing["input_size"][-1]
    interpolation = InterpolationMode(preprocessing.get("interpolation", "bilinear"))
    normalize = [T.ToTensor(), T.Normalize(preprocessing["mean"], preprocessing["std"])]
    if augment == "light":
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=LIGHT_CROP_SCALE, ratio=CROP_RATIO, interpolation=interpolation),
                T.RandomHorizontalFlip(),
                *normalize,
            ]
        )
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=interpolation),
            T.RandomHorizontalFlip(),
            T.RandomRotation(15, interpolation=InterpolationMode.BILINEAR),
            T.ColorJitter(0.3, 0.3, 0.3, 0.05),
            *normalize,
        ]
    )


class AugmentedView:
    """View ``view`` of an image: the ``light`` preset's random-resized crop and mirror, then the
    ``policy``'s timm RandAugment where it has one, drawn by generators seeded with the image's
    content digest and ``view``, so a file gives the same view in every run and the view's
    activations can be cached. ``spec`` names what decides it. The crop is drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws it, from a generator of its own: that one reads the
    process-wide generator, which threads share."""

    def __init__(self, preprocessing: dict[str, Any], view: int, policy: str = "light"):
        self.preprocessing = preprocessing
        self.view = view
        self.policy = policy
        self.spec = view_spec(policy)
        self.rand_augment = None
        if VIEW_POLICIES[policy]:
            from timm.data.auto_augment import rand_augment_transform

            mean = tuple(round(255 * m) for m in preprocessing["mean"])  # what a shifted image's edges are filled with
            self.rand_augment = rand_augment_transform(VIEW_POLICIES[policy], {"img_mean": mean})

    def __call__(self, image: Image.Image, digest: bytes) -> np.ndarray:
        seed = [int.from_bytes(digest, "big"), self.view]
        random = np.random.default_rng(seed)
        left, top, width, height = crop_box(image.size, random)
        size = self.preprocessing["input_size"][-1]
        resample = RESAMPLING[self.preprocessing.get("interpolation", "bilinear")]
        image = image.crop((left, top, left + width, top + height)).resize((size, size), resample)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            image = _seeded(self.rand_augment, image.convert("RGB"), int(random.integers(2**32)))
        return normalize_image(image, self.preprocessing)


def view_spec(policy: str) -> str:
    """What decides a view under ``policy``: part of its cache folder's name."""
    light = f"light-crop scale={LIGHT_CROP_SCALE} ratio={CROP_RATIO} mirror=0.5 seed=sha256+view v1"
    return light if policy == "light" else f"{light} timm={VIEW_POLICIES[policy]}"


_GLOBAL_RANDOM = threading.Lock()


def _seeded(transform: Any, image: Image.Image, seed: int) -> Image.Image:
    """``transform(image)`` with Python's and NumPy's global generators (timm's RandAugment draws
    from them) seeded with ``seed``, then put back as they were: the caller's draws stay its own,
    and the lock keeps the feature pass's threads from drawing from each other's seeds."""
    with _GLOBAL_RANDOM:
        python_state, numpy_state = pyrandom.getstate(), np.random.get_state()
        pyrandom.seed(seed)
        np.random.seed(seed)
        try:
            return transform(image)
        finally:
            pyrandom.setstate(python_state)
            np.random.set_state(numpy_state)


def crop_box(image_size: tuple[int, int], random: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the light preset's random-resized crop: an area share in
    ``LIGHT_CROP_SCALE`` and an aspect ratio in ``CROP_RATIO`` (log-uniform), ten tries, then the
    centre crop of the nearest ratio."""
    scale, ratio = LIGHT_CROP_SCALE, CROP_RATIO
    width, height = image_size
    area = width * height
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(random.integers(0, width - w + 1)), int(random.integers(0, height - h + 1)), w, h
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def preprocess_to_tensor(image: Image.Image, preprocessing: dict[str, Any]) -> torch.Tensor:
    import torch

    return torch.from_numpy(preprocess_image(image, preprocessing))
