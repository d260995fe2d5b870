"""Two-phase transfer learning, top to bottom.

Phase 1 ("frozen"): the backbone is frozen and only the head trains. Without augmentation,
every image's pooled features are computed once (and cached), and the head trains on them in a
plain loop (``head``), each epoch in milliseconds. With augmentation it trains on images.
Phase 2 ("finetune"): the top blocks are unfrozen and train at a lower learning rate, on the
cached activations of the frozen blocks below them where they can be cached (``auto``, the
default; ``activation_inputs``), else on augmented images. The final model is the phase with
the lowest validation loss.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from transferkit._io import write_csv
from transferkit.audit.config import DUPLICATE_THRESHOLD
from transferkit.cache.activations import (
    ViewDataset,
    boundary_activations,
    finetune_boundary,
    inference_backend,
    split_bounds,
    training_loader,
    training_views,
)
from transferkit.cache.shards import CachedRows
from transferkit.cache.store import FeatureCache, FeatureStats
from transferkit.commands.audit import audit_of_run
from transferkit.config import MANY_BLOCKS, MANY_BLOCKS_FROM, TrainConfig, parse_unfreeze, unfreeze_is_auto
from transferkit.data.exclude import read_exclusions
from transferkit.data.folders import discover
from transferkit.data.index import DatasetIndex
from transferkit.data.groups import LEAK_COLUMNS, Leaks
from transferkit.data.images import scan_images
from transferkit.data.loaders import image_loader, resolve_preprocessing
from transferkit.data.registry import resolve_data_source, source_problems
from transferkit.errors import ConfigError, RunFolderError
from transferkit.models.create import create_classifier
from transferkit.models.folder import save_model_folder, save_trust
from transferkit.run.folder import RunFolder, holds_work, prepare_folder
from transferkit.run.lock import claim
from transferkit.run.records import PhaseRecord, RunMetrics
from transferkit.training.evaluation import PhaseInputs, evaluate_phases
from transferkit.training.head_loop import LabelledFeatures, train_head
from transferkit.training.lightning import FineTuning, ImageClassifier, fit_with_lightning
from transferkit.training.phase import class_weights, create_sampler, training_loss
from transferkit.training.progress import PhaseProgress
from transferkit.training.splitting import SplitFeatures, clean_val_rows, pooled_features_of, split_honestly
from transferkit.training.trainer_options import process_rank, trainer_options

log = logging.getLogger(__name__)

RUN_DIR_ENV = "TRANSFERKIT_RUN_DIR"


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports; everything is also in ``run_dir``."""

    run_dir: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]
    metrics: dict[str, Any]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    best_phase: str = ""
    duplicates: dict[str, int] = dataclasses.field(default_factory=dict)
    """Counts of identical-image groups: groups, across_splits, across_classes."""
    audit: str = ""
    """The audit's one-line summary (``--audit``), else empty."""

    @property
    def model_dir(self) -> Path:
        return RunFolder(self.run_dir).model_dir

    @property
    def run_metrics(self) -> RunMetrics:
        """``metrics`` as typed records (rank zero of a multi-process run has them)."""
        return RunMetrics.from_dict(self.metrics)


def train(data: str | os.PathLike[str], config: TrainConfig | None = None) -> TrainResult:
    """Train a classifier on ``data`` as ``config`` says (default: ``TrainConfig()``) and write
    the run folder (``config.output``, else ``resolve_run_dir``'s choice).

    ``data`` is an image folder (``DATA/<class>/*`` or ``DATA/{train,val[,test]}/<class>/*``) or
    the name of a registered dataset.
    """
    problems = source_problems(data)
    if problems:
        raise ConfigError(problems)
    return _train(os.fspath(data), config if config is not None else TrainConfig(), resume=False)


def resume(run_dir: str | Path) -> TrainResult:
    """Finish an interrupted run from its folder: finished phases are skipped and an interrupted
    phase continues from its last checkpoint."""
    source, config = RunFolder(run_dir).read_record()
    return _train(source, config, resume=True)


def resolve_run_dir(data: str | os.PathLike[str], config: TrainConfig) -> Path:
    """The folder a train of ``data`` writes: ``config.output``, else ``runs/<data>-<model>-<time>``.

    Absolute, because Lightning reports checkpoint paths absolute and they are stored relative.
    Every process of a multi-process run (launched by Lightning with the same command line, or
    by torchrun or SLURM) resolves the folder rank zero named with its own clock.
    """
    if config.output:
        return Path(config.output).absolute()
    if process_rank() != 0 and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    name = Path(os.fspath(data)).name or "data"
    return Path("runs", f"{name}-{config.model.name.replace('/', '_')}-{datetime.now():%Y%m%d-%H%M%S}").absolute()


def _train(source: str, config: TrainConfig, resume: bool) -> TrainResult:
    started = time.perf_counter()
    lightning_options = trainer_options(
        config.accelerator, config.devices, config.num_nodes, config.strategy, config.precision
    )
    run_dir = resolve_run_dir(source, config)
    config = dataclasses.replace(config, output=str(run_dir))  # the caller's config stays as it was
    os.environ[RUN_DIR_ENV] = str(run_dir)  # for the processes Lightning launches
    if process_rank() != 0:  # rank zero holds the folder for the whole run
        return _train_in(RunFolder(run_dir), source, config, resume, lightning_options, started)
    prepare_folder(run_dir)
    RunFolder(run_dir).refuse_links_out()  # before any work, so a refusal loses none
    with claim(run_dir):
        if not resume and RunFolder(run_dir).config_file.exists():
            if holds_work(run_dir):
                raise RunFolderError(
                    f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another --output"
                )
            log.info("%s holds a start that failed before training; starting again", run_dir)
        return _train_in(RunFolder(run_dir), source, config, resume, lightning_options, started)


def _train_in(
    folder: RunFolder, source: str, config: TrainConfig, resume: bool, trainer_options: dict[str, Any], started: float
) -> TrainResult:
    """The recipe: data, model, the head phase, fine-tuning, evaluation, the saved model."""
    main_process = process_rank() == 0
    index, discovered = _prepare_index(source, config, folder, resume)
    classes = index.classes

    # The new head's initialisation draws from the global generator: seed before building it.
    L.seed_everything(config.seed, workers=True, verbose=False)

    def create_model() -> nn.Module:
        return create_classifier(config.model, len(classes), config.data.image_size)

    model = create_model()
    preprocessing = resolve_preprocessing(model, config.data.image_size)
    # Decided on the split as first cut, whose training share the groups barely move: with cached
    # activations, the pass that computes them also stores every image's pooled features, so the
    # bottom of the backbone runs once per image and the split by near-copies reads them.
    unfreeze = parse_unfreeze(config.finetune.unfreeze, len(index.targets("train")))
    boundary = finetune_boundary(model, unfreeze, config, preprocessing, index) if config.finetune.epochs > 0 else None
    split_features, leaks, cached = _split_on_features(index, discovered, model, preprocessing, boundary, config)
    if main_process:
        _write_index(index, leaks, folder, config.data.drop_duplicates)
    targets = index.targets("train")
    val_rows = clean_val_rows(index.splits.get("val", []), leaks.images("val"))
    val_items = [index.splits.get("val", [])[row] for row in val_rows]
    # Saved once the data and the model are usable: a bad folder, model name or weights file
    # leaves no half-made run, so the same command can simply run again.
    if main_process:
        folder.write_config(source, config)
    progress = PhaseProgress(folder, write=main_process, create_pretrained=create_model, model=model)
    loss = training_loss(
        config.label_smoothing, class_weights(targets, len(classes)) if config.class_balance == "weight" else None
    )
    sampler = create_sampler(targets, len(classes), config.seed, config.class_balance)
    workers = config.data.resolved_num_workers()

    def images(split: str, augment: str = "none") -> Any:
        training = split == "train"
        return image_loader(
            val_items if split == "val" else index.splits[split], preprocessing, config.data.batch_size, workers,
            augment=augment,
            sampler=sampler if training else None,
        )

    def on_images(name: str, unfreeze: int | float | None) -> Any:
        phase = getattr(config, name)
        finetuning = FineTuning(name, phase, unfreeze, config.batchnorm)
        return lambda resume_from: fit_with_lightning(
            ImageClassifier(model, loss, finetuning), images("train", phase.augment), images("val"),
            folder=folder, name=name, resume_from=resume_from, trainer_options=trainer_options,
            progress_bar=config.progress,
        )

    def on_activations(
        unfreeze: int | float | None, boundary: int, cached: dict[str, CachedRows], views: list[CachedRows]
    ) -> Any:
        phase = config.finetune
        finetuning = FineTuning("finetune", phase, unfreeze, config.batchnorm)
        train_batches = training_loader([cached["train"], *views], targets, sampler, config.data.batch_size)
        val = Subset(ViewDataset([cached["val"]], torch.tensor(index.targets("val"))), val_rows.tolist())
        val_batches = DataLoader(val, config.data.batch_size)
        return lambda resume_from: fit_with_lightning(
            ImageClassifier(model, loss, finetuning, boundary, phase.augment), train_batches, val_batches,
            folder=folder, name="finetune", resume_from=resume_from, trainer_options=trainer_options,
            progress_bar=config.progress,
        )

    if config.finetune.epochs > 0 and unfreeze_is_auto(config.finetune.unfreeze):
        log.info("--finetune-unfreeze auto: %d blocks for %s training images (%d from %s)",
                 unfreeze, f"{len(targets):,}", MANY_BLOCKS, f"{MANY_BLOCKS_FROM:,}")
    head_on_features = config.frozen.epochs > 0 and config.feature_cache and config.frozen.augment == "none"
    if boundary is not None and not cached:  # every row in the cache by now: this only cuts it by the new split
        cached, _ = boundary_activations(model, boundary, index, preprocessing, config)
    views: list[CachedRows] = []  # of the training images (--finetune-views)
    if boundary is not None and not progress.finished("finetune"):
        views = training_views(model, boundary, index, preprocessing, config)
    features: dict[str, torch.Tensor] = {}
    feature_stats: FeatureStats | None = None
    if config.frozen.epochs > 0:
        if head_on_features:
            array, feature_stats = split_features.in_order(index), split_features.stats
            features = {split: torch.from_numpy(array[bounds]) for split, bounds in split_bounds(index).items()}
            train_split = LabelledFeatures(features["train"], torch.tensor(targets))
            chosen = torch.from_numpy(val_rows)
            val_split = LabelledFeatures(features["val"][chosen], torch.tensor(index.targets("val"))[chosen])

            def on_features(resume_from: Path | None) -> PhaseRecord:
                return train_head(
                    model, config.frozen, train_split, val_split, loss=loss, sampler=sampler,
                    batch_size=config.data.batch_size, drop_rate=config.model.drop_rate, folder=folder,
                    name="frozen", resume_from=resume_from, write=main_process,
                )

            _run_phase("frozen", on_features, model, progress, config.seed, config.frozen.lr)
        else:
            _run_phase("frozen", on_images("frozen", unfreeze=0), model, progress, config.seed, config.frozen.lr)
    if config.finetune.epochs > 0:
        progress.backbone_pretrained = False
        fit = on_images("finetune", unfreeze) if boundary is None else on_activations(unfreeze, boundary, cached, views)
        _run_phase("finetune", fit, model, progress, config.seed, config.finetune.lr)
    if not main_process:
        # Another process of a multi-process run: rank zero evaluates and writes the results.
        return TrainResult(run_dir=folder.root, classes=classes, counts=index.counts(), metrics={})

    inputs = PhaseInputs(index, preprocessing, features, boundary, cached, inference_backend(config), workers,
                         config.progress, val_rows=val_rows)
    metrics, trust = evaluate_phases(model, progress, inputs, calibrate_on_val=config.calibrate,
                                     unknown_score=config.unknown_score, unknown_keep=config.unknown_keep)
    save_model_folder(model, folder.writable(folder.model_dir), classes, preprocessing, config.model)
    save_trust(folder.model_dir, trust)
    metrics.trust = trust.as_dict()
    metrics.train_seconds = round(time.perf_counter() - started, 2)
    metrics.leaks = leaks.summary()
    if feature_stats is not None:
        metrics.features = feature_stats.as_dict()
    folder.write_metrics(metrics)
    audit_line = audit_of_run(
        index, config.data, config.model, config.seed, config.cache_dir, config.progress,
        folder.writable(folder.audit_dir), split_features.in_order(index),
    ) if config.audit else ""
    if config.report:
        from transferkit.reporting.report import write_report

        try:
            write_report([folder.root])
        except Exception as error:  # noqa: BLE001 - the model is saved; `transferkit report` can try again
            log.warning("the report could not be written (%s); the run is complete, try `transferkit report %s`",
                        error, folder.root)
    return TrainResult(
        run_dir=folder.root, classes=classes, counts=index.counts(), metrics=metrics.to_dict(),
        skipped=index.skipped, best_phase=metrics.best_phase, duplicates=index.duplicate_kinds(), audit=audit_line,
    )


def _run_phase(name: str, fit: Any, model: nn.Module, progress: PhaseProgress, seed: int, lr: float) -> None:
    """Train phase ``name`` with ``fit(resume_from)`` unless an earlier invocation finished it;
    either way ``model`` ends with the best usable weights so far."""
    if progress.finished(name):
        progress.load_last_usable(model)
        log.info("phase %s already finished; reusing its best checkpoint", name)
        return
    # Seeded again, so that a phase draws the same shuffles, augmentations and dropout masks
    # whether the phase before it ran in this process or in an earlier one.
    L.seed_everything(seed, workers=True, verbose=False)
    record = fit(progress.resume_from(name))
    progress.record(name, record, f"--{name}-lr", lr)
    if record.diverged:  # a fit leaves its best weights in the model; these are not usable
        progress.load_last_usable(model)


def _split_on_features(
    index: DatasetIndex, discovered: bool, model: nn.Module, preprocessing: dict[str, Any], boundary: int | None,
    config: TrainConfig,
) -> tuple[SplitFeatures, Leaks, dict[str, CachedRows]]:
    """Every image's pooled features, then the split cut again by groups (where it was carved now)
    and checked for near-copies across it; the boundary activations where the split stood."""
    activation_stats, cached = None, {}
    if boundary is not None:
        pooled = FeatureCache.for_backbone(model, preprocessing, config.model.global_pool, config.cache_dir)
        cached, activation_stats = boundary_activations(model, boundary, index, preprocessing, config, pooled)
    order = {name: list(items) for name, items in index.splits.items()}
    features = pooled_features_of(index, model, preprocessing, config.model.global_pool, inference_backend(config),
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
    return features, leaks, cached if index.splits == order else {}


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


def _write_index(index: DatasetIndex, leaks: Leaks, folder: RunFolder, drop_duplicates: bool) -> None:
    if index.duplicates:
        kinds = index.duplicate_kinds()
        log.warning(
            "%d groups of identical images (%d across splits, %d under two classes), listed in %s%s",
            kinds["groups"], kinds["across_splits"], kinds["across_classes"], folder.duplicates_file.name,
            "; dropping them" if drop_duplicates else "; --drop-duplicates drops them",
        )
    if index.skipped:
        log.warning("skipped %d files (listed in %s)", len(index.skipped), folder.skipped_file.name)
    folder.write_index(index)
    write_csv(folder.leaks_file, LEAK_COLUMNS, leaks.rows())
