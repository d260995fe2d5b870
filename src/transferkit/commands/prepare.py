"""What ``train`` and ``lr-find`` do alike before a phase trains: the data index, the model and
its plan, every image's pooled features (the split cut again by groups), the cached activations
and the loss and sampler the phases read."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from transferkit.audit.config import DUPLICATE_THRESHOLD
from transferkit.cache.activations import ActivationPass, boundary_activations, split_bounds, training_views
from transferkit.cache.shards import CachedRows
from transferkit.cache.store import FeatureCache
from transferkit.config import TrainConfig
from transferkit.data.exclude import read_exclusions
from transferkit.data.folders import DatasetIndex, discover
from transferkit.data.groups import Leaks
from transferkit.data.images import scan_images
from transferkit.data.loaders import resolve_preprocessing
from transferkit.data.registry import resolve_data_source
from transferkit.models.create import create_classifier
from transferkit.run.folder import RunFolder
from transferkit.training.estimate import describe, estimate_run, resolve_preset
from transferkit.training.phase import class_weights, create_sampler, epoch_log, training_loss
from transferkit.training.plan import FitPlan
from transferkit.training.progress import PhaseProgress
from transferkit.training.recipe import FitInputs
from transferkit.training.splitting import SplitFeatures, clean_val_rows, pooled_features_of, split_honestly

log = logging.getLogger(__name__)


@dataclass
class PreparedFit:
    """The run as it stands before its first phase."""

    config: TrainConfig
    """The config with its preset resolved."""
    index: DatasetIndex
    model: nn.Module
    create_model: Callable[[], nn.Module]
    """The model as it was before any phase: a new head on the pretrained backbone."""
    preprocessing: dict[str, Any]
    plan: FitPlan
    activation_pass: ActivationPass
    split_features: SplitFeatures
    leaks: Leaks
    activations: dict[str, CachedRows]
    val_rows: np.ndarray


def prepare_fit(
    source: str, config: TrainConfig, folder: RunFolder, resume: bool, lightning_options: dict[str, Any],
    started: float, say_estimate: bool,
) -> PreparedFit:
    """The data, the model and its plan, the cached features and activations; with ``say_estimate``,
    the line that says how long the run should take."""
    index, discovered = _prepare_index(source, config, folder, resume)
    counts = {split: len(items) for split, items in index.splits.items()}
    config, estimates = resolve_preset(config, counts, len(index.classes), time.perf_counter() - started)
    # The new head's initialisation draws from the global generator: seed before building it.
    L.seed_everything(config.seed, workers=True, verbose=False)
    create_model = functools.partial(create_classifier, config.model, len(index.classes), config.data.image_size)
    model = create_model()
    preprocessing = resolve_preprocessing(model, config.data.image_size)
    if say_estimate:
        epoch_log.info(describe(estimates.get(config.preset) or estimate_run(config, model, preprocessing, counts)))
    plan = FitPlan.decide(config, model, preprocessing, index, lightning_options, started)
    activation_pass = ActivationPass.of(config)
    split_features, leaks, activations = _split_on_features(
        index, discovered, model, preprocessing, plan.boundary, config, activation_pass
    )
    val_rows = clean_val_rows(index.splits.get("val", []), leaks.images("val"))
    return PreparedFit(config, index, model, create_model, preprocessing, plan, activation_pass, split_features,
                       leaks, activations, val_rows)


def fit_inputs(prepared: PreparedFit, progress: PhaseProgress) -> FitInputs:
    """The loss, the sampler and the cached inputs of the split as it now stands."""
    index, plan, config, model = prepared.index, prepared.plan, prepared.config, prepared.model
    preprocessing, activation_pass, activations = prepared.preprocessing, prepared.activation_pass, prepared.activations
    targets = index.targets("train")
    weights = class_weights(targets, len(index.classes)) if config.class_balance == "weight" else None
    loss = training_loss(config.label_smoothing, weights)
    sampler = create_sampler(targets, len(index.classes), config.seed, config.class_balance)
    plan.log_unfreeze(len(targets))
    if plan.boundary is not None and not activations:  # every row in the cache by now: this only cuts it by the new split
        activations, _ = boundary_activations(model, plan.boundary, index, preprocessing, activation_pass)
    views: list[CachedRows] = []  # of the training images (--finetune-views)
    if plan.boundary is not None and not progress.finished("finetune"):
        if plan.views < config.finetune_views:
            log.info("--finetune-views %d: %d fine-tuning epochs read %d of them; only those are computed",
                     config.finetune_views, config.finetune.epochs, plan.views)
        views = training_views(model, plan.boundary, index, preprocessing, plan.views, activation_pass)
    features: dict[str, torch.Tensor] = {}
    if plan.head_on_features:
        array = prepared.split_features.in_order(index)
        features = {split: torch.from_numpy(array[bounds]) for split, bounds in split_bounds(index).items()}
    return FitInputs(index, preprocessing, loss, sampler, features, activations, views, prepared.val_rows)


def _split_on_features(
    index: DatasetIndex, discovered: bool, model: nn.Module, preprocessing: dict[str, Any], boundary: int | None,
    config: TrainConfig, activation_pass: ActivationPass,
) -> tuple[SplitFeatures, Leaks, dict[str, CachedRows]]:
    """Every image's pooled features, then the split cut again by groups (where it was carved now)
    and checked for near-copies across it; the boundary activations where the split stood."""
    activation_stats, activations = None, {}
    if boundary is not None:
        pooled = FeatureCache.for_backbone(model, preprocessing, config.model.global_pool, config.cache_dir)
        activations, activation_stats = boundary_activations(model, boundary, index, preprocessing, activation_pass,
                                                             pooled)
    order = {name: list(items) for name, items in index.splits.items()}
    features = pooled_features_of(index, model, preprocessing, config.model.global_pool, activation_pass.backend,
                                  config.cache_dir, config.data.resolved_num_workers(), config.progress)
    if activation_stats is not None:
        # The pass's own: counted as this run's work, not as read from the cache.
        computed = activation_stats.images - activation_stats.from_cache
        reused = min(computed, features.stats.from_cache)
        if reused:
            features.stats = dataclasses.replace(features.stats, from_cache=features.stats.from_cache - reused,
                                                 seconds=features.stats.seconds + activation_stats.seconds)
    leaks = split_honestly(index, features, carve=discovered, split_groups=config.data.split_groups,
                           group_by=config.data.group_by, threshold=DUPLICATE_THRESHOLD, seed=config.seed,
                           max_per_class=config.data.max_per_class)
    return features, leaks, activations if index.splits == order else {}


def _prepare_index(source: str, config: TrainConfig, folder: RunFolder, resuming: bool) -> tuple[DatasetIndex, bool]:
    """The run's images and, when they were found now (not resumed, not ``--splits-from``), True:
    their split may still be cut again by groups."""
    root = resolve_data_source(source, config.data.data_mirror, config.data.download)
    if resuming and folder.has_index():
        return folder.read_index(root), False
    discovered = not config.data.splits_from
    if config.data.splits_from:
        index = RunFolder(config.data.splits_from).read_index(root)
    else:
        index = discover(root, config.data.split, config.seed, config.data.max_per_class)
        paths = [path for items in index.splits.values() for path, _ in items]
        index.drop(scan_images(paths, config.data.resolved_num_workers()))
        index.find_duplicates()
        if config.data.drop_duplicates:
            index.drop_duplicates()
    if config.data.exclude:
        index.drop(read_exclusions(config.data.exclude, index.root, {path for items in index.splits.values() for path, _ in items}))
    return index, discovered
