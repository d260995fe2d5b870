"""Evaluation and prediction with a trained classifier (the metrics themselves are in ``metrics``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit._io import not_regular_reason
from transferkit.calibration import before_and_after, uncalibrated_probabilities
from transferkit.data.folders import image_extensions, list_image_files, read_labelled_folder, split_folders
from transferkit.errors import DataError
from transferkit.inference import Predictor, load_predictor
from transferkit.metrics import Evaluation, evaluation_from_probabilities, unknown_share
from transferkit.runs import RunFolder, is_onnx_file

log = logging.getLogger(__name__)

def default_split(split_names: Iterable[str]) -> str:
    """The split a run is judged on: test when the run has one, else validation."""
    return "test" if "test" in split_names else "val"


def run_split_items(run_dir: Path, split: str | None, classes: list[str]) -> tuple[str, list[tuple[str, int]]]:
    """(split, its items) from the run's split; ``split`` None means the default one."""
    splits = RunFolder(run_dir).read_splits(classes)
    split = split or default_split(splits)
    if split not in splits:
        raise DataError(
            f"run {run_dir} has no {split} split (it has {', '.join(splits)}); choose one of those"
        )
    return split, splits[split]


def evaluate(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    split: str | None = None,
    output: str | os.PathLike[str] | None = None,
    tta: bool = False,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """Evaluate a run's model on one of its own splits or on any labelled image folder.

    ``data`` is a folder of ``<class>/<image>`` whose class names are the run's (a subset is
    fine); a folder holding train/val/test folders is read at ``split`` (default test).
    Without ``data``, the run's own ``split`` is used (default: test, else val). The metrics
    and one row per image are written to ``output`` (default ``RUN/evaluation/<name>``).
    ``run`` may also be an exported ``.onnx`` file, which then needs ``data``.
    """
    run_dir = Path(run)
    classifier = load_predictor(run_dir)
    if data is None:
        if is_onnx_file(run_dir):
            raise DataError(f"{run_dir} is a model file without data splits; give a labelled folder DATA to evaluate on")
        split, items = run_split_items(run_dir, split, classifier.classes)
        skipped: list[tuple[str, str]] = []
        name = split
    else:
        root = Path(data)
        if split is not None:
            folders = split_folders(root) if root.is_dir() else {}
            if split not in folders:
                raise DataError(f"{root} has no {split} folder; point at a folder of class folders or drop --split")
            root = folders[split]
        items, skipped = read_labelled_folder(root, classifier.classes)
        name = root.name
    unreadable: dict[str, str] = {}
    probabilities, scores = classifier.scored(
        [path for path, _ in items], batch_size=batch_size, num_workers=num_workers, tta=tta, progress=progress,
        unreadable=unreadable,
    )
    skipped += sorted(unreadable.items())
    items = [item for item in items if item[0] not in unreadable]
    if not items:
        raise DataError(f"no readable images in {data or run_dir}; expected <class>/<image>.jpg folders")
    if skipped:
        log.warning("skipped %d files that are not readable images", len(skipped))
    evaluation = evaluation_from_probabilities(name, classifier.classes, items, probabilities)
    evaluation.skipped = skipped
    evaluation.metrics["tta"] = tta
    calibration = classifier.info.get("calibration")
    if calibration and not tta:  # a mirror-averaged probability has no single logit to undo T from
        evaluation.metrics["calibration"] = before_and_after(
            uncalibrated_probabilities(probabilities, classifier.temperature), evaluation.targets,
            classifier.temperature, calibration["fitted_on"],
        )
    if scores is not None and classifier.unknown:
        evaluation.metrics["unknown"] = unknown_share(scores, classifier.unknown)
    # An exported file keeps its evaluations beside it, as a run keeps them in its folder.
    home = RunFolder(run_dir.parent if is_onnx_file(run_dir) else run_dir)
    evaluation.write(Path(output) if output else home.writable(home.evaluation_dir(name + ("-tta" if tta else ""))))
    return evaluation


# --- prediction -------------------------------------------------------------------------------


UNKNOWN = "unknown"


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]
    unknown_score: float | None = None
    """How unlike the training images the image is (higher is less alike); None without a score."""
    unknown: bool = False
    """Whether the score is above the model's threshold, with rejection on."""

    @property
    def answer(self) -> str:
        """The top label, or ``unknown``."""
        return UNKNOWN if self.unknown else self.labels[0]


@dataclass
class PredictionResult:
    predictions: list[Prediction]
    skipped: list[tuple[str, str]]


def collect_images(inputs: list[str | os.PathLike[str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files named directly or found below the folders, in order; missing paths are skipped."""
    extensions = image_extensions()
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found, ignored = list_image_files(path, extensions)
            if not found:
                skipped.append((str(path), "folder holds no image files"))
            files += sorted(found)
            skipped += ignored
        elif reason := not_regular_reason(path):  # a FIFO would hang the decoder, /dev/zero never ends
            skipped.append((str(path), reason))
        elif path.is_file() or path.is_symlink():  # a broken or looping link gets its reason from the decoder
            files.append(str(path))
        else:
            skipped.append((str(path), "no such file or folder"))
    return files, skipped


def predict(
    run: str | os.PathLike[str] | Predictor,
    inputs: list[str | os.PathLike[str]],
    top_k: int = 5,
    batch_size: int = 64,
    num_workers: int | None = None,
    tta: bool = False,
    progress: bool = False,
    reject: bool = True,
) -> PredictionResult:
    """Top-k labels and (calibrated) probabilities for every image in ``inputs`` (files or
    folders), with the unknown score where the model has one; with ``reject``, an image scored
    above the model's threshold is answered ``unknown``.

    Files that are not readable images are listed in ``skipped``, never fatal.
    """
    classifier = run if isinstance(run, Predictor) else load_predictor(run)
    files, skipped = collect_images(inputs)
    unreadable: dict[str, str] = {}
    probabilities, scores = classifier.scored(
        files, batch_size=batch_size, num_workers=num_workers, tta=tta, progress=progress, unreadable=unreadable
    )
    skipped += sorted(unreadable.items())
    files = [path for path in files if path not in unreadable]
    k = max(1, min(top_k, len(classifier.classes)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    threshold = classifier.unknown["threshold"] if reject and classifier.unknown and scores is not None else None
    predictions = [
        Prediction(
            path, [classifier.classes[i] for i in row], [float(probabilities[n, i]) for i in row],
            unknown_score=None if scores is None else float(scores[n]),
            unknown=threshold is not None and float(scores[n]) > threshold,  # type: ignore[index]
        )
        for n, (path, row) in enumerate(zip(files, order))
    ]
    return PredictionResult(predictions, skipped)
