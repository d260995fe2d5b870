"""Torch DataLoaders and augmentation for training, and the preprocessing a backbone's pretrained
config asks for; decoding and the eval transform themselves are torch-free, in ``data.images``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transferkit.data.images import load_image, resize_side
from transferkit.data.transforms import create_transform
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
