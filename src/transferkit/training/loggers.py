"""Experiment tracking through Lightning's own loggers (``--logger csv,tensorboard,mlflow,wandb``):
the run's config as hyperparameters, every epoch of both phases (the head loop's and Lightning's,
through ``PhaseBookkeeping``), the final metrics, and the model folder and figures as artifacts.

Their files live in the run folder's ``logs/``; MLflow's default store is a SQLite file there,
since recent MLflow refuses its plain file store. A resumed run continues the same MLflow and W&B
run (their ids are kept in ``logs/run-ids.json``) and the same TensorBoard folder; Lightning's
CSVLogger starts a file of its own per invocation (it deletes one it finds), each epoch in one file."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transferkit._io import read_json, write_json
from transferkit.run.records import EpochRecord
from transferkit.training.config import INSTALL_LOGGER, parse_loggers

EXPERIMENT = "transferkit"
"""The MLflow experiment and W&B project runs are logged under."""
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def missing_packages(text: str | None) -> list[str]:
    """One line per chosen logger whose package is not installed, naming the command that installs it."""
    return [f"--logger {name} needs the {name} package; install it with: {INSTALL_LOGGER[name]}"
            for name in parse_loggers(text) if INSTALL_LOGGER.get(name) and importlib.util.find_spec(name) is None]


def create_loggers(
    text: str | None, logs_dir: Path, run_name: str, mlflow_uri: str | None, hparams: dict[str, Any]
) -> list[Any]:
    """Lightning's loggers for ``--logger text``, writing under ``logs_dir``, with ``hparams`` (the
    run's config.yaml values) as their hyperparameters; a run already logged there (a resumed
    one) continues its MLflow and W&B runs."""
    if not parse_loggers(text):
        return []
    logs_dir.mkdir(parents=True, exist_ok=True)
    ids_file = logs_dir / "run-ids.json"
    names = parse_loggers(text)
    resumed = read_json(ids_file) if ids_file.is_file() else {}
    loggers = [_create(name, logs_dir, run_name, mlflow_uri, resumed.get(name)) for name in names]
    ids = {name: logger.version for name, logger in zip(names, loggers) if name in ("mlflow", "wandb")}
    if ids:
        write_json(ids_file, ids)
    for name, logger in zip(names, loggers):
        # A continued run keeps the values it started with: MLflow refuses a parameter logged again
        # with another value, as an ``auto`` learning rate is once found.
        if not resumed.get(name):
            logger.log_hyperparams(hparams)
            logger.save()
    return loggers


def _create(name: str, logs_dir: Path, run_name: str, mlflow_uri: str | None, run_id: str | None) -> Any:
    from lightning.pytorch import loggers

    if name == "csv":
        return loggers.CSVLogger(logs_dir, name="csv")
    if name == "tensorboard":
        # One folder whatever the invocation, so a resumed run is one TensorBoard run.
        return loggers.TensorBoardLogger(logs_dir, name="", version="tensorboard", default_hp_metric=False)
    if name == "wandb":
        logger = loggers.WandbLogger(name=run_name, project=EXPERIMENT, save_dir=str(logs_dir), id=run_id,
                                     resume="allow")
        logger.experiment  # noqa: B018 - starts the run: its id is None until then, and a resume needs it
        return logger
    uri = mlflow_uri or f"sqlite:///{(logs_dir / 'mlflow.db').absolute()}"
    _create_experiment(uri, _artifact_location(uri))
    logger = loggers.MLFlowLogger(EXPERIMENT, run_name=run_name, tracking_uri=uri, run_id=run_id)
    if run_id:  # a resumed run is running again until it finishes
        logger.experiment.update_run(run_id, status="RUNNING")
    else:
        logger.experiment  # noqa: B018 - creates the run, whose id a resume needs
    return logger


def _artifact_location(uri: str) -> str | None:
    """Beside a SQLite store (MLflow's default, ./mlruns, would be wherever train was started);
    a tracking server's own default elsewhere."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).absolute().parent / "mlflow-artifacts").as_uri()


def _create_experiment(uri: str, artifact_location: str | None) -> None:
    """The experiment, made here so its artifacts stay beside a local store (and Lightning has
    no warning to print about making it). MLflow's notes on creating its tables stay off the console."""
    from mlflow.tracking import MlflowClient

    store_log = logging.getLogger("mlflow.store.db.utils")
    level = store_log.level
    store_log.setLevel(max(level, logging.WARNING))
    try:
        client = MlflowClient(uri)
        if client.get_experiment_by_name(EXPERIMENT) is None:
            client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    finally:
        store_log.setLevel(level)


def log_epoch(loggers: Sequence[Any], record: EpochRecord) -> None:
    """One epoch's history row as ``<phase>/<column>`` at step ``epoch`` of the phase."""
    values = {name: getattr(record, name) for name in EPOCH_METRICS}
    metrics = {f"{record.phase}/{name}": value for name, value in values.items() if value is not None}
    for logger in loggers:
        logger.log_metrics(metrics, step=record.epoch)
        logger.save()


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """metrics.json's numbers per split (``val/accuracy``, ``test/log_loss``, ...) and the run's time."""
    found = {f"{split}/{name}": float(value) for split in ("val", "test") for name, value in metrics.get(split, {}).items()
             if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
    return {**found, "train_seconds": float(metrics.get("train_seconds", 0.0))}


def log_results(loggers: Sequence[Any], metrics: dict[str, Any], files: Sequence[Path], folders: Sequence[Path]) -> None:
    """The final metrics, then ``files`` and ``folders`` (the model, the figures) as artifacts where
    a logger keeps them (MLflow, W&B); TensorBoard gets the PNG figures as images."""
    final = final_metrics(metrics)
    # A run without its report or audit has no such file: W&B's artifact refuses a missing path.
    files, folders = [path for path in files if path.is_file()], [path for path in folders if path.is_dir()]
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":  # its HPARAMS view pairs the config with these metrics
            logger.log_hyperparams(logger.hparams, metrics=final, step=0)
        else:
            logger.log_metrics(final, step=0)
        if kind == "MLFlowLogger":
            for path in files:
                logger.experiment.log_artifact(logger.run_id, str(path))
            for folder in folders:
                logger.experiment.log_artifacts(logger.run_id, str(folder), folder.name)
        elif kind == "TensorBoardLogger":
            _add_figures(logger.experiment, [path for folder in folders for path in sorted(folder.glob("*.png"))])
        elif kind == "WandbLogger":
            import wandb

            artifact = wandb.Artifact(f"{logger.experiment.id}-run", type="model")
            for path in files:
                artifact.add_file(str(path))
            for folder in folders:  # in a folder of its name, as MLflow keeps them: model/, figures/
                artifact.add_dir(str(folder), name=folder.name)
            logger.experiment.log_artifact(artifact)
        logger.save()


def _add_figures(writer: Any, paths: list[Path]) -> None:
    import numpy as np
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            writer.add_image(f"figures/{path.stem}", np.asarray(image.convert("RGB")), dataformats="HWC")


@contextlib.contextmanager
def finished_when_done(loggers: Sequence[Any]) -> Iterator[None]:
    """Each logger's run marked finished when the block ends, failed on an error, killed on Ctrl-C."""
    try:
        yield
    except KeyboardInterrupt:
        _finalize(loggers, "KILLED")
        raise
    except BaseException:
        _finalize(loggers, "failed")
        raise
    _finalize(loggers, "success")


def _finalize(loggers: Sequence[Any], status: str) -> None:
    for logger in loggers:
        logger.finalize(status)
