"""Torch DataLoaders and augmentation for training, and the preprocessing a backbone's pretrained
config asks for; decoding and the eval transform themselves are torch-free, in ``data.images``."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from transferkit.data.images import RESAMPLING, load_image, normalize_image, preprocess_image, resize_side
from transferkit.errors import DataError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader


def resolve_preprocessing(model: torch.nn.Module, image_size: int | None = None) -> dict[str, Any]:
    """Input size, interpolation, mean, std and crop from the backbone's pretrained config.

    Where the weights name a test-time size (timm's ``test_input_size``), that size is used for
    every phase: the frozen features are only as good as the resolution they are computed at.
    """
    import timm.data

    config = dict(timm.data.resolve_model_data_config(model, use_test_size=True))
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    config["mean"] = tuple(float(v) for v in config["mean"])
    config["std"] = tuple(float(v) for v in config["std"])
    config["input_size"] = tuple(int(v) for v in config["input_size"])
    return config


def _preprocess_to_tensor(image: Image.Image, preprocessing: dict[str, Any]) -> torch.Tensor:
    import torch

    return torch.from_numpy(preprocess_image(image, preprocessing))


LIGHT_CROP_SCALE = (0.5, 1.0)
"""The ``light`` preset's random-resized crop: the share of the image's area it keeps."""
CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect ratios of the random-resized crops (torchvision's default)."""


def create_transform(preprocessing: dict[str, Any], augment: str = "none") -> Any:
    """The image-to-tensor transform: the eval preprocessing, or it behind random crops and flips
    (``light``) and rotation and colour jitter as well (``strong``)."""
    if augment == "none":
        # A partial of a module-level function pickles, so spawned DataLoader workers can take it.
        return functools.partial(_preprocess_to_tensor, preprocessing=preprocessing)
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
    """View ``view`` of an image: the ``light`` preset's random-resized crop and mirror, drawn by
    a generator seeded with the image's content digest and ``view``, so a file gives the same
    view in every run and the view's activations can be cached. ``spec`` names what decides it.
    The crop is drawn as torchvision's ``RandomResizedCrop.get_params`` draws it, from a generator
    of its own: that one reads the process-wide generator, which threads share."""

    spec = f"light-crop scale={LIGHT_CROP_SCALE} ratio={CROP_RATIO} mirror=0.5 seed=sha256+view v1"

    def __init__(self, preprocessing: dict[str, Any], view: int):
        self.preprocessing = preprocessing
        self.view = view

    def __call__(self, image: Image.Image, digest: bytes) -> np.ndarray:
        random = np.random.default_rng([int.from_bytes(digest, "big"), self.view])
        left, top, width, height = crop_box(image.size, random)
        size = self.preprocessing["input_size"][-1]
        resample = RESAMPLING[self.preprocessing.get("interpolation", "bilinear")]
        image = image.crop((left, top, left + width, top + height)).resize((size, size), resample)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize_image(image, self.preprocessing)


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


class ImageDataset:
    """(image tensor, label) pairs for a DataLoader; ``min_side`` enables reduced-scale JPEG decoding."""

    def __init__(self, items: list[tuple[str, int]], transform: Any, min_side: int | None = None):
        self.items = items
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        try:
            image = load_image(path, self.min_side)
        except Exception as error:
            raise DataError(f"{path} could not be read ({error}); remove or replace the file") from None
        return self.transform(image), label


def image_loader(
    items: list[tuple[str, int]],
    preprocessing: dict[str, Any],
    batch_size: int,
    num_workers: int,
    augment: str = "none",
    shuffle: bool = False,
    sampler: Any = None,
) -> DataLoader:
    import torch
    from torch.utils.data import DataLoader

    dataset = ImageDataset(items, create_transform(preprocessing, augment), min_side=resize_side(preprocessing))
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
