"""Fine-tuning's cached inputs: where a run's backbone splits, the boundary activations of every
image, and the activations of augmented views of the training images, from the persistent cache.

View k of a training image (``--finetune-views``) is ``data.transforms.AugmentedView``: the light
augmentation's random crop and mirror, then timm's RandAugment under ``--finetune-view-policy``,
drawn from the image's content digest and k, so it is the same in every run and cached like the
plain activations, in a folder of its own named by the backbone, the boundary, k and the
augmentation's spec. Epoch e trains on view e mod (N + 1),
view 0 being the plain activations; the view is a function of the epoch alone, so a resumed run
reads what a run never stopped would have.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferkit.cache.passes import thumbnail_cache
from transferkit.cache.shards import CachedRows
from transferkit.cache.store import (
    FeatureCache,
    FeatureStats,
    backbone_digest,
    feature_cache_folder,
    output_row_shape,
)
from transferkit.config import TrainConfig
from transferkit.data.index import DatasetIndex
from transferkit.data.thumbnails import ThumbnailTap
from transferkit.data.transforms import AugmentedView
from transferkit.errors import ConfigError
from transferkit.inference.predictor import Forward, create_forward, default_backend, run_forward
from transferkit.models.freeze import backbone_blocks, count_unfrozen
from transferkit.models.split import Bottom, BottomAndPooled, activation_bytes, boundary_index, layer_sequence
from transferkit.training.phase import EpochSampler

log = logging.getLogger(__name__)


def inference_backend(accelerator: str) -> str:
    """The backend a pass over images runs on for Lightning's ``accelerator`` choice."""
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    return default_backend("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ActivationPass:
    """Where the activations are cached and how a pass computes the missing ones."""

    cache_dir: str | None
    global_pool: str
    """The backbone's pooling, part of the cache's key."""
    backend: str
    num_workers: int
    progress_bar: bool
    view_policy: str = "light"
    """How views of the training images are drawn (``--finetune-view-policy``)."""

    @classmethod
    def of(cls, config: TrainConfig) -> ActivationPass:
        return cls(config.cache_dir, config.model.global_pool, inference_backend(config.accelerator),
                   config.data.resolved_num_workers(), config.progress, config.finetune_view_policy)


def boundary_cache_folder(
    model: nn.Module, boundary: int, preprocessing: dict[str, Any], cache_dir: str | None, global_pool: str
) -> Path:
    """The feature-cache folder of the activations at ``boundary``, keyed like the backbone's
    features and by the layer below the boundary."""
    layer = layer_sequence(model)[boundary - 1][0]  # type: ignore[index]
    digest = backbone_digest(model, preprocessing, global_pool)
    return feature_cache_folder(cache_dir) / f"{digest}-after-{layer}"


def split_bounds(index: DatasetIndex) -> dict[str, slice]:
    """Where each split's rows lie among rows in the order of ``index.splits``' images."""
    result, start = {}, 0
    for split, items in index.splits.items():
        result[split] = slice(start, start + len(items))
        start += len(items)
    return result


def views_read(views: int, epochs: int) -> int:
    """How many of ``views`` (``--finetune-views``) fine-tuning's ``epochs`` read: epoch e reads view
    e mod (N + 1), so E epochs read views 1 to E - 1 at most, and a view no epoch reads is neither
    computed nor counted in the budget (with 2 epochs, 2 views read 1)."""
    return min(views, max(epochs - 1, 0))


def finetune_boundary(
    model: nn.Module, unfreeze: int | float | None, config: TrainConfig, preprocessing: dict[str, Any],
    index: DatasetIndex,
) -> int | None:
    """Where fine-tuning's input is cached: the boundary below the unfrozen blocks, or None for
    images. Under ``auto`` a run that cannot cache them says why in one line; one that asked for
    activations stops before training, with the reason and the fix."""
    if config.finetune_on == "images":
        return None
    boundary = boundary_index(model, unfreeze)
    reason = None
    if boundary is None:
        blocks = len(backbone_blocks(model))
        if count_unfrozen(blocks, unfreeze) >= blocks:
            reason = "every backbone block trains (--finetune-unfreeze), so no layer below them stays fixed"
        elif layer_sequence(model) is None:
            reason = f"{type(model).__name__} has no layer sequence to split (EfficientNet and ResNet families do)"
        else:
            reason = f"the blocks that train do not start at a layer of {type(model).__name__}'s sequence"
    else:
        read = views_read(config.finetune_views, config.finetune.epochs)
        rows = sum(len(items) for items in index.splits.values()) + read * len(index.splits["train"])
        size = rows * activation_bytes(model, boundary, preprocessing["input_size"]) / 1e9
        if size > config.activation_cache_gb:
            views = f" with {read} views of each training image" if read else ""
            reason = (f"the activations{views} would take {size:.1f} GB, over --activation-cache-gb "
                      f"{config.activation_cache_gb:g}")
    if reason is None:
        return boundary
    if config.finetune_on == "activations":
        raise ConfigError([f"--finetune-on activations: {reason}; --finetune-on auto fine-tunes on images instead"])
    ignored = f"; --finetune-views {config.finetune_views} is not used" if config.finetune_views else ""
    log.info("fine-tuning on images: %s%s", reason, ignored)
    return None


def boundary_activations(
    model: nn.Module, boundary: int, index: DatasetIndex, preprocessing: dict[str, Any], run: ActivationPass,
    pooled: FeatureCache | None = None,
) -> tuple[dict[str, CachedRows], FeatureStats]:
    """The activations at ``boundary`` of every split's images, float16, from the persistent
    cache where it has them (keyed like the pooled features, and by the boundary), and how many
    it had. The pass that computes the others stores their pooled features in ``pooled`` (the
    backbone's feature cache) too, so the backbone's bottom runs once per image."""
    paths = [path for items in index.splits.values() for path, _ in items]
    rows, stats = _cached_activations(model, boundary, paths, preprocessing, run, view=0, pooled=pooled)
    return {split: rows.subset(bounds.start, bounds.stop) for split, bounds in split_bounds(index).items()}, stats


def training_views(
    model: nn.Module, boundary: int, index: DatasetIndex, preprocessing: dict[str, Any], views: int,
    run: ActivationPass,
) -> list[CachedRows]:
    """Views 1 to ``views`` of the training images' activations at ``boundary``, one
    ``CachedRows`` each, rows in the order of the training split; each from its own cache folder."""
    paths = [path for path, _ in index.splits["train"]]
    return [_cached_activations(model, boundary, paths, preprocessing, run, view)[0] for view in range(1, views + 1)]


def _cached_activations(
    model: nn.Module, boundary: int, paths: list[str], preprocessing: dict[str, Any], run: ActivationPass, view: int,
    pooled: FeatureCache | None = None,
) -> tuple[CachedRows, FeatureStats]:
    """The activations of view ``view`` (0: the image itself) of every path, computed a chunk at a
    time where the cache lacks them, each chunk's pooled features stored in ``pooled`` beside them
    (and the images' thumbnails in theirs); a killed pass keeps every chunk it stored. They stay in
    the cache's files, read as needed."""
    folder = boundary_cache_folder(model, boundary, preprocessing, run.cache_dir, run.global_pool)
    transform = None
    if view:
        transform = AugmentedView(preprocessing, view, run.view_policy)
        spec = hashlib.sha256(transform.spec.encode()).hexdigest()[:12]
        folder = folder.with_name(f"{folder.name}-view{view}-{spec}")
    kind = f"activations (view {view})" if view else "activations and features" if pooled else "activations"
    # Every row a cache hit still gets its shape checked against what this model gives.
    row_shape = output_row_shape(Bottom(model, boundary), preprocessing["input_size"])
    cache = FeatureCache(folder, np.float16, kind, row_shape=row_shape)
    forward: list[Forward] = []

    def compute(missing: list[str], digests: dict[str, bytes]) -> Any:
        if not forward:
            module = Bottom(model, boundary) if pooled is None else BottomAndPooled(model, boundary)
            forward.append(create_forward(module, preprocessing["input_size"], run.backend))
        tap = ThumbnailTap(preprocessing) if pooled is not None else None
        outputs = run_forward(
            forward[0], missing, preprocessing, num_workers=run.num_workers,
            progress=run.progress_bar, description=kind, digests=digests, transform=transform or tap,
        )
        if pooled is None or tap is None:
            return outputs
        below, features = outputs
        pooled.store(missing, features, digests)
        thumbnail_cache(pooled.folder).store(*tap.rows(missing, digests), digests)
        return below

    return cache.rows(paths, compute)


class ViewSampler(torch.utils.data.Sampler[int]):
    """``sampler``'s order of epoch e, pointing into view e mod ``views`` of a ``ViewDataset``:
    the epoch, which Lightning sets before each (and restores on resume), picks the view."""

    def __init__(self, sampler: EpochSampler, views: int):
        self.sampler = sampler
        self.views = views

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def view(self) -> int:
        return self.sampler.epoch % self.views

    def __iter__(self) -> Iterator[int]:
        offset = self.view * self.sampler.num_samples
        return (offset + i for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class ViewDataset(Dataset):
    """(activations, label) of a split's images under each of its views (the training split's
    ``--finetune-views``, or the validation split's one), view v's row i at index v x images + i;
    each row is read from the cache when asked."""

    def __init__(self, views: list[CachedRows], targets: torch.Tensor):
        self.views = views
        self.targets = targets

    def __len__(self) -> int:
        return len(self.views) * len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view, row = divmod(index, len(self.targets))
        return self.views[view][row], self.targets[row]


def training_loader(
    views: list[CachedRows], targets: list[int], sampler: EpochSampler, batch_size: int
) -> DataLoader:
    """Fine-tuning's training batches on cached activations: ``views[0]`` the plain ones, one
    view an epoch in turn."""
    dataset = ViewDataset(views, torch.tensor(targets))
    return DataLoader(dataset, batch_size, sampler=ViewSampler(sampler, len(views)))
