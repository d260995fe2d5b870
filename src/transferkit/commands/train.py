"""``train`` and ``resume``: the run folder and its lock, the data index, the model, the fit
(``training.recipe``), then the evaluation, the saved model, the audit and the report."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from torch import nn

from transferkit.commands.audit import audit_of_run
from transferkit.commands.prepare import fit_inputs, prepare_fit
from transferkit.config import TrainConfig
from transferkit.data.registry import source_problems
from transferkit.errors import ConfigError, RunFolderError
from transferkit.models.folder import save_model_folder, save_trust
from transferkit.reporting.report import write_report_of_run
from transferkit.run.folder import RunFolder, holds_work, prepare_folder
from transferkit.run.lock import claim
from transferkit.run.records import RunMetrics
from transferkit.run.result import TrainResult
from transferkit.training.console import console
from transferkit.training.evaluation import PhaseInputs, evaluate_phases
from transferkit.training.loggers import create_loggers, finished_when_done, log_results, missing_packages
from transferkit.training.presets import AUTO, DEFAULT_PRESET
from transferkit.training.progress import PhaseProgress
from transferkit.training.recipe import fine_tune
from transferkit.training.splitting import write_index_of_run
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
    prepared = prepare_fit(source, config, folder, resume, lightning_options, started, say_estimate=main_process)
    config, index, model, plan, leaks = prepared.config, prepared.index, prepared.model, prepared.plan, prepared.leaks
    split_features, val_rows = prepared.split_features, prepared.val_rows
    if main_process:
        write_index_of_run(index, leaks, folder, config.data.drop_duplicates)
        # Saved once the data and the model are usable: a bad folder, model name or weights file
        # leaves no half-made run, so the same command can simply run again.
        folder.write_config(source, config)
    loggers = create_loggers(config.logger, folder.writable(folder.logs_dir), folder.root.name, config.mlflow_uri,
                             config.to_record(source)) if main_process else []
    with finished_when_done(loggers):  # the trackers' run marked finished, failed or killed, from its start
        progress = PhaseProgress(folder, write=main_process, create_pretrained=prepared.create_model, model=model,
                                 loggers=loggers)
        inputs = fit_inputs(prepared, progress)
        fine_tune(model, plan, inputs, progress)
        if not main_process:
            # Another process of a multi-process run: rank zero evaluates and writes the results.
            return TrainResult(run_dir=folder.root, classes=index.classes, counts=index.counts(), metrics={})
        phase_inputs = PhaseInputs(index, prepared.preprocessing, inputs.features, plan.boundary, inputs.activations,
                                   prepared.activation_pass.backend, plan.num_workers, config.progress,
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


