"""``train`` and ``resume``: the run folder and its lock, the data index, the model, the fit
(``training.recipe``), then the evaluation, the saved model, the audit and the report."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from transferkit.audit.config import DUPLICATE_THRESHOLD
from transferkit.cache.activations import ActivationPass, boundary_activations, split_bounds, training_views
from transferkit.cache.shards import CachedRows
from transferkit.cache.store import FeatureCache
from transferkit.commands.audit import audit_of_run
from transferkit.config import TrainConfig
from transferkit.data.exclude import read_exclusions
from transferkit.data.folders import DatasetIndex, discover
from transferkit.data.groups import Leaks
from transferkit.data.images import scan_images
from transferkit.data.loaders import resolve_preprocessing
from transferkit.data.registry import resolve_data_source, source_problems
from transferkit.errors import ConfigError, RunFolderError
from transferkit.models.create import create_classifier
from transferkit.models.folder import save_model_folder, save_trust
from transferkit.reporting.report import write_report_of_run
from transferkit.run.folder import RunFolder, holds_work, prepare_folder
from transferkit.run.lock import claim
from transferkit.run.records import RunMetrics
from transferkit.run.result import TrainResult
from transferkit.training.console import console
from transferkit.training.estimate import describe, estimate_run, resolve_preset
from transferkit.training.evaluation import PhaseInputs, evaluate_phases
from transferkit.training.loggers import create_loggers, finished_when_done, log_results, missing_packages
from transferkit.training.phase import class_weights, create_sampler, epoch_log, training_loss
from transferkit.training.plan import FitPlan
from transferkit.training.presets import AUTO, DEFAULT_PRESET
from transferkit.training.progress import PhaseProgress
from transferkit.training.recipe import FitInputs, fine_tune
from transferkit.training.splitting import (
    SplitFeatures,
    clean_val_rows,
    pooled_features_of,
    split_honestly,
    write_index_of_run,
)
from transferkit.training.trainer_options import process_rank, trainer_options

log = logging.getLogger(__name__)

RUN_DIR_ENV = "TRANSFERKIT_RUN_DIR"


def train(
    data: str | os.PathLike[str], config: TrainConfig | None = None, *, epochs: int | None = None,
    model: str | None = None, output: str | os.PathLike[str] | None = None, seed: int | None = None,
    options: dict[str, Any] | None = None, progress: bool = True, preset: str | None = None,
    time_limit: str | None = None,
) -> TrainResult:
    """Train a classifier on ``data`` and write the run folder (``output``, else
    ``runs/<data>-<model>-<time>``): ``transferkit.train("photos/", epochs=3)``.

    ``data`` is an image folder (``DATA/<class>/*`` or ``DATA/{train,val[,test]}/<class>/*``) or
    the name of a registered dataset. ``config`` (default: ``TrainConfig()``) is the whole
    configuration; ``epochs`` (both phases' most, as ``--epochs``), ``model`` (a timm name),
    ``output``, ``seed`` and ``options`` (any ``TrainConfig.from_options`` key, e.g.
    ``{"finetune.lr": 1e-4}``) change it; ``preset`` (``fast``, ``balanced``, ``best``, ``auto``)
    sets its options under every other one, and ``time_limit`` (``"20m"``) picks it where none is
    given and stops a phase before an epoch that would end past it. ``progress`` shows the epoch
    lines and a summary where logging is not set up (see ``training.console``).
    """
    problems = source_problems(data)
    if problems:
        raise ConfigError(problems)
    base, options = config or TrainConfig(), options or {}
    if (time_limit or options.get("time_limit")) and (preset or options.get("preset")) is None \
            and base.preset == DEFAULT_PRESET:
        preset = AUTO  # as on the command line: a limit alone lets the data choose
    overrides = {key: value for key, value in (("epochs", epochs), ("model.name", model), ("seed", seed),
                                               ("output", output and os.fspath(output)), ("preset", preset),
                                               ("time_limit", time_limit)) if value is not None}
    config = base.with_options({**overrides, **options})
    with console(progress) as show:
        result = _train(os.fspath(data), config, resume=False)
        show(result)
    return result


def resume(run_dir: str | Path, *, progress: bool = True) -> TrainResult:
    """Finish an interrupted run from its folder: finished phases are skipped and an interrupted
    phase continues from its last checkpoint."""
    source, config = RunFolder(run_dir).read_record()
    with console(progress) as show:
        result = _train(source, config, resume=True)
        show(result)
    return result


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
    model = AUTO if config.preset == AUTO else config.model.name.replace("/", "_")  # chosen once the data is read
    return Path("runs", f"{name}-{model}-{datetime.now():%Y%m%d-%H%M%S}").absolute()


def _train(source: str, config: TrainConfig, resume: bool) -> TrainResult:
    started = time.perf_counter()
    lightning_options = trainer_options(
        config.accelerator, config.devices, config.num_nodes, config.strategy, config.precision
    )
    if missing_packages(config.logger):  # before any work, as the Lightning options
        raise ConfigError(missing_packages(config.logger))
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
    folder: RunFolder, source: str, config: TrainConfig, resume: bool, lightning_options: dict[str, Any],
    started: float,
) -> TrainResult:
    """The data, the model and its plan, the fit; rank zero then evaluates and saves."""
    main_process = process_rank() == 0
    index, discovered = _prepare_index(source, config, folder, resume)
    counts = {split: len(items) for split, items in index.splits.items()}
    config, estimates = resolve_preset(config, counts, len(index.classes), time.perf_counter() - started)
    # The new head's initialisation draws from the global generator: seed before building it.
    L.seed_everything(config.seed, workers=True, verbose=False)
    create_model = functools.partial(create_classifier, config.model, len(index.classes), config.data.image_size)
    model = create_model()
    preprocessing = resolve_preprocessing(model, config.data.image_size)
    if main_process:
        epoch_log.info(describe(estimates.get(config.preset) or estimate_run(config, model, preprocessing, counts)))
    plan = FitPlan.decide(config, model, preprocessing, index, lightning_options, started)
    activation_pass = ActivationPass.of(config)
    split_features, leaks, activations = _split_on_features(
        index, discovered, model, preprocessing, plan.boundary, config, activation_pass
    )
    if main_process:
        write_index_of_run(index, leaks, folder, config.data.drop_duplicates)
        # Saved once the data and the model are usable: a bad folder, model name or weights file
        # leaves no half-made run, so the same command can simply run again.
        folder.write_config(source, config)
    val_rows = clean_val_rows(index.splits.get("val", []), leaks.images("val"))
    loggers = create_loggers(config.logger, folder.writable(folder.logs_dir), folder.root.name, config.mlflow_uri,
                             config.to_record(source)) if main_process else []
    with finished_when_done(loggers):  # the trackers' run marked finished, failed or killed, from its start
        progress = PhaseProgress(folder, write=main_process, create_pretrained=create_model, model=model,
                                 loggers=loggers)
        inputs = _fit_inputs(model, plan, index, preprocessing, split_features, activations, progress, config,
                             activation_pass, val_rows)
        fine_tune(model, plan, inputs, progress)
        if not main_process:
            # Another process of a multi-process run: rank zero evaluates and writes the results.
            return TrainResult(run_dir=folder.root, classes=index.classes, counts=index.counts(), metrics={})
        phase_inputs = PhaseInputs(index, preprocessing, inputs.features, plan.boundary, inputs.activations,
                                   activation_pass.backend, plan.num_workers, config.progress,
                                   val_rows=val_rows)
        metrics = _evaluate_and_save(model, progress, phase_inputs, config, folder)
        metrics.train_seconds = round(time.perf_counter() - started, 2)
        metrics.leaks = leaks.summary()
        if plan.head_on_features:
            metrics.features = split_features.stats.as_dict()
        folder.write_metrics(metrics)
        audit_line = audit_of_run(
            index, config.data, config.model, config.seed, config.cache_dir, config.progress,
            folder.writable(folder.audit_dir), split_features.in_order(index),
        ) if config.audit else ""
        if config.report:
            write_report_of_run(folder.root)
        log_results(loggers, metrics.to_dict(), [folder.metrics_file, folder.config_file, folder.history_file,
                                                  folder.report_file], [folder.model_dir, folder.figures_dir])
        return TrainResult(
            run_dir=folder.root, classes=index.classes, counts=index.counts(), metrics=metrics.to_dict(),
            skipped=index.skipped, best_phase=metrics.best_phase, duplicates=index.duplicate_kinds(),
            audit=audit_line,
        )


def _fit_inputs(
    model: nn.Module, plan: FitPlan, index: DatasetIndex, preprocessing: dict[str, Any], split_features: SplitFeatures,
    activations: dict[str, CachedRows], progress: PhaseProgress, config: TrainConfig, activation_pass: ActivationPass,
    val_rows: np.ndarray,
) -> FitInputs:
    """The loss, the sampler and the cached inputs of the split as it now stands."""
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
        array = split_features.in_order(index)
        features = {split: torch.from_numpy(array[bounds]) for split, bounds in split_bounds(index).items()}
    return FitInputs(index, preprocessing, loss, sampler, features, activations, views, val_rows)


def _evaluate_and_save(
    model: nn.Module, progress: PhaseProgress, inputs: PhaseInputs, config: TrainConfig, folder: RunFolder
) -> RunMetrics:
    """Every phase judged, the best one's weights, temperature and threshold saved as the run's model."""
    metrics, trust = evaluate_phases(model, progress, inputs, calibrate_on_val=config.calibrate,
                                     unknown_score=config.unknown_score, unknown_keep=config.unknown_keep)
    save_model_folder(model, folder.writable(folder.model_dir), inputs.index.classes, inputs.preprocessing,
                      config.model)
    save_trust(folder.model_dir, trust)
    metrics.trust = trust.as_dict()
    return metrics


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
