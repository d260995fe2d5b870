"""``transferkit calibrate``: fit a trained model's temperature and unknown threshold again,
on its validation split or on another labelled folder, and save them in its model folder (see
``trust.records`` for what they are and ``models.folder`` for where they live)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.errors import ConfigError, DataError, RunFolderError
from transferkit.run.folder import RunFolder, model_folder
from transferkit.trust.records import Trust

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def calibrate(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    unknown_score: str | None = None,
    unknown_keep: float | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[Trust, list[tuple[str, str]]]:
    """Fit a run's temperature and unknown threshold again, on a labelled folder ``data``
    (``<class>/<image>``, the run's class names or a subset) or, without it, on the run's
    validation split; save them in its model folder. ``unknown_score`` and ``unknown_keep``
    default to the model's own (else ``knn`` and 0.95). Returns the new Trust and the files
    that were skipped."""
    import numpy as np
    import torch

    from transferkit.inference.loading import saved_classes_and_preprocessing
    from transferkit.inference.predictor import create_forward, default_backend, run_forward
    from transferkit.models.create import PooledFeatures, classify_pooled
    from transferkit.models.folder import load_model, save_trust
    from transferkit.trust.temperature import fit_calibration
    from transferkit.trust.unknown import fit_rejection

    folder = model_folder(run)
    run_folder = RunFolder.containing(run)
    if run_folder.is_run():  # a run's model: never written through a link out of the run
        run_folder.writable(folder)
    model, config = load_model(folder)
    classes, preprocessing = saved_classes_and_preprocessing(model, config, folder)
    old = _old_trust(folder, config)
    method, keep = _unknown_settings(old, unknown_score, unknown_keep)
    items, skipped, fitted_on = _labelled_items(run_folder, data, classes)
    forward = create_forward(PooledFeatures(model), preprocessing["input_size"], default_backend("cpu"))

    def pooled(paths: list[str], unreadable: dict[str, str] | None = None) -> torch.Tensor:
        return torch.from_numpy(run_forward(forward, paths, preprocessing, batch_size, num_workers, progress,
                                            "calibrate", unreadable=unreadable).reshape(-1, model.num_features))

    unreadable: dict[str, str] = {}
    features = pooled([path for path, _ in items], unreadable)
    skipped += sorted(unreadable.items())
    targets = np.array([label for path, label in items if path not in unreadable])
    if not len(targets):
        raise DataError(f"no readable labelled images in {data or run_folder.root}; expected <class>/<image>.jpg folders")
    with torch.inference_mode():
        logits = classify_pooled(model, features, 0.0).numpy()
    trust = Trust(calibration=fit_calibration(logits, targets, fitted_on))
    if method == "knn":
        kept_knn = old.rejection is not None and old.rejection.method == "knn"
        saved = _saved_bank(folder, model.num_features) if kept_knn else None
        trust.bank = saved if saved is not None else _training_bank(run_folder, classes, pooled)
    trust.rejection = fit_rejection(method, keep, torch.from_numpy(logits / trust.temperature), features,
                                    trust.bank, fitted_on)
    save_trust(folder, trust)
    _record_in_run(run_folder, trust)
    return trust, skipped


def _unknown_settings(old: Trust, unknown_score: str | None, unknown_keep: float | None) -> tuple[str, float]:
    """The unknown score and share to fit: those asked for, else the model's own, else knn and 0.95."""
    from transferkit.trust.records import METHODS

    method = unknown_score or (old.rejection.method if old.rejection else "knn")
    keep = unknown_keep if unknown_keep is not None else (old.rejection.keep if old.rejection else 0.95)
    problems = []
    if method not in METHODS:
        problems.append(f"--unknown-score must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < keep <= 1:
        problems.append(f"--unknown-keep must be in (0, 1], got {keep}")
    if problems:
        raise ConfigError(problems)
    return method, keep


def _labelled_items(
    run_folder: RunFolder, data: str | os.PathLike[str] | None, classes: list[str],
) -> tuple[list[tuple[str, int]], list[tuple[str, str]], str]:
    """(items, skipped files, what they are) to fit on: the folder ``data``, else the run's val split."""
    from transferkit.data.folders import read_labelled_folder
    from transferkit.run.folder import run_split_items

    if data is None:
        return run_split_items(run_folder.root, "val", classes)[1], [], "val"
    items, skipped = read_labelled_folder(Path(data), classes)
    return items, skipped, str(data)


def _record_in_run(run_folder: RunFolder, trust: Trust) -> None:
    """The run's metrics say what its model now carries; its exports, which do not, are named."""
    metrics = run_folder.read_metrics()
    if metrics is not None:
        metrics.trust = trust.as_dict()
        run_folder.write_metrics(metrics)
    if run_folder.export_dir.is_dir():
        log.warning("exports in %s still carry the old temperature and threshold; export again", run_folder.export_dir)


def _old_trust(folder: Path, config: dict[str, Any]) -> Trust:
    """The model's temperature and unknown threshold, whose score and share calibrate keeps; none
    where they are damaged, since refitting them is the fix their error names."""
    from transferkit.models.folder import load_trust

    try:
        return load_trust(folder, config)
    except RunFolderError as error:
        log.warning("%s; fitting new ones", error)
        return Trust()


def _saved_bank(folder: Path, width: int) -> torch.Tensor | None:
    """The knn score's training features the model folder holds; None where they are lost or
    damaged, so that they are taken again from the training images."""
    from transferkit.models.folder import load_bank

    try:
        return load_bank(folder, width)
    except RunFolderError as error:
        log.warning("%s; taking the training images' features again", error)
        return None


def _training_bank(run_folder: RunFolder, classes: list[str], pooled: Any) -> torch.Tensor:
    """The knn score's features of a sample of the run's training images."""
    import numpy as np

    from transferkit.trust.unknown import training_bank

    if not run_folder.splits_file.is_file():
        raise RunFolderError(
            f"{run_folder.root} has no training split to take the knn score's features from; "
            "use --unknown-score msp or energy, or give the run folder"
        )
    items = run_folder.read_splits(classes)["train"]
    return training_bank(np.array([label for _, label in items]), lambda rows: pooled([items[row][0] for row in rows]))
