"""Metrics, evaluation and prediction with a trained classifier.

``compute_metrics`` works on (probabilities, targets) alone, so training, ``evaluate`` and
``compare`` report the same numbers computed the same way. Where scikit-learn has a metric,
it computes it; the tests hold every number against scikit-learn on the same predictions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import not_regular_reason, write_csv, write_json
from transferkit.data.folders import image_extensions, list_image_files, read_labelled_folder, split_folders
from transferkit.errors import DataError
from transferkit.inference import Predictor, load_predictor
from transferkit.runs import RunFolder, evaluation_files, is_onnx_file

log = logging.getLogger(__name__)

TOP_K = (3, 5)
CALIBRATION_BINS = 15
MOST_CONFUSED = 10
HIGHEST_LOSS = 16
PREDICTION_COLUMNS = ["path", "label", "predicted", "confidence", "label_probability", "loss"]


def reliability_bins(probabilities: np.ndarray, targets: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Top-1 confidence in equal-width bins: count, mean confidence and accuracy per bin."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins, as in torchmetrics: a confidence of exactly 1.0 lands in the last bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
    return {
        "edges": edges.tolist(),
        "count": counts.tolist(),
        "accuracy": [None if np.isnan(v) else float(v) for v in accuracy],
        "confidence": [None if np.isnan(v) else float(v) for v in mean_confidence],
    }


def expected_calibration_error(bins: dict[str, Any]) -> float:
    """Sum over bins of |accuracy - confidence|, weighted by the share of images in the bin."""
    total = sum(bins["count"])
    return float(
        sum(
            count / total * abs(accuracy - confidence)
            for count, accuracy, confidence in zip(bins["count"], bins["accuracy"], bins["confidence"])
            if count
        )
    )


def label_losses(probabilities: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's probability of its true label, and its log loss."""
    label_probability = np.asarray(probabilities, dtype=np.float64)[np.arange(len(targets)), targets]
    return label_probability, -np.log(np.clip(label_probability, 1e-15, None))


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def compute_metrics(
    probabilities: np.ndarray,
    targets: np.ndarray | list[int],
    classes: list[str],
    paths: list[str] | None = None,
) -> dict[str, Any]:
    """Every metric of one labelled set of predictions.

    Averages (macro, weighted, balanced) follow scikit-learn: they run over the classes present
    in the labels or the predictions. Per-class rows cover every class; a class with no images
    and no predictions has null precision, recall and F1 rather than a made-up zero.
    """
    from sklearn import metrics as sk

    probabilities = np.asarray(probabilities, dtype=np.float64)
    # float32 softmax rows sum to 1 only within ~1e-7; scikit-learn's log loss insists on more.
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    targets = np.asarray(targets, dtype=np.int64)
    labels = list(range(len(classes)))
    predictions = probabilities.argmax(axis=1)
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        targets, predictions, labels=labels, zero_division=np.nan
    )
    confusion = sk.confusion_matrix(targets, predictions, labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.nan_to_num(confusion / confusion.sum(axis=1, keepdims=True))
    bins = reliability_bins(probabilities, targets)
    label_probability, losses = label_losses(probabilities, targets)

    off_diagonal = [
        (int(confusion[t, p]), t, p) for t in labels for p in labels if t != p and confusion[t, p] > 0
    ]
    off_diagonal.sort(key=lambda item: (-item[0], item[1], item[2]))
    result: dict[str, Any] = {
        "images": int(len(targets)),
        "accuracy": float(sk.accuracy_score(targets, predictions)),
        "balanced_accuracy": float(sk.balanced_accuracy_score(targets, predictions)),
        "top_k_accuracy": {
            str(k): float(sk.top_k_accuracy_score(targets, probabilities, k=k, labels=labels))
            for k in TOP_K
            if k < len(classes)
        },
        "macro_precision": float(sk.precision_score(targets, predictions, average="macro", zero_division=0)),
        "macro_recall": float(sk.recall_score(targets, predictions, average="macro", zero_division=0)),
        "macro_f1": float(sk.f1_score(targets, predictions, average="macro", zero_division=0)),
        "weighted_f1": float(sk.f1_score(targets, predictions, average="weighted", zero_division=0)),
        "log_loss": float(sk.log_loss(targets, probabilities, labels=labels)),
        "expected_calibration_error": expected_calibration_error(bins),
        "per_class": [
            {"class": name, "precision": p, "recall": r, "f1": f, "support": int(s)}
            for name, p, r, f, s in zip(classes, _nan_to_none(precision), _nan_to_none(recall), _nan_to_none(f1), support)
        ],
        "confusion_matrix": confusion.tolist(),
        "confusion_matrix_normalized": normalized.round(6).tolist(),
        "most_confused": [
            {"label": classes[t], "predicted": classes[p], "count": count} for count, t, p in off_diagonal[:MOST_CONFUSED]
        ],
        "reliability": bins,
    }
    if paths is not None:
        worst = np.argsort(-losses, kind="stable")[:HIGHEST_LOSS]
        result["highest_loss"] = [
            {
                "path": paths[i],
                "label": classes[targets[i]],
                "predicted": classes[predictions[i]],
                "confidence": float(probabilities[i, predictions[i]]),
                "label_probability": float(label_probability[i]),
                "loss": float(losses[i]),
            }
            for i in worst
        ]
    return result


HEADLINE_METRICS = (
    "images", "accuracy", "balanced_accuracy", "top_k_accuracy", "macro_f1", "weighted_f1", "log_loss",
    "expected_calibration_error",
)


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics, without the per-class rows, matrices and image lists."""
    return {key: metrics[key] for key in HEADLINE_METRICS if key in metrics}


@dataclass
class Evaluation:
    """Predictions and metrics of a classifier on one labelled set of images."""

    name: str
    classes: list[str]
    paths: list[str]
    targets: np.ndarray
    probabilities: np.ndarray
    metrics: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    output: Path | None = None

    def write(self, folder: Path) -> None:
        """The metrics and the predictions (one row per image) in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        metrics_file, predictions_file = evaluation_files(folder)
        write_json(metrics_file, {"name": self.name, "skipped": len(self.skipped), **self.metrics})
        predictions = self.probabilities.argmax(axis=1)
        label_probability, losses = label_losses(self.probabilities, self.targets)

        rows = (
            [path, self.classes[label], self.classes[predicted], f"{row[predicted]:.6f}", f"{probability:.6f}", f"{loss:.6f}"]
            for path, label, predicted, row, probability, loss in zip(
                self.paths, self.targets, predictions, self.probabilities, label_probability, losses
            )
        )
        write_csv(predictions_file, PREDICTION_COLUMNS, rows)
        self.output = folder


def evaluation_from_probabilities(
    name: str, classes: list[str], items: list[tuple[str, int]], probabilities: np.ndarray
) -> Evaluation:
    paths = [path for path, _ in items]
    targets = np.array([label for _, label in items], dtype=np.int64)
    return Evaluation(
        name=name, classes=classes, paths=paths, targets=targets, probabilities=probabilities,
        metrics=compute_metrics(probabilities, targets, classes, paths),
    )


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
    probabilities = classifier.probabilities(
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
    # An exported file keeps its evaluations beside it, as a run keeps them in its folder.
    home = RunFolder(run_dir.parent if is_onnx_file(run_dir) else run_dir)
    evaluation.write(Path(output) if output else home.evaluation_dir(name + ("-tta" if tta else "")))
    return evaluation


# --- prediction -------------------------------------------------------------------------------


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]


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
) -> PredictionResult:
    """Top-k labels and probabilities for every image in ``inputs`` (files or folders).

    Files that are not readable images are listed in ``skipped``, never fatal.
    """
    classifier = run if isinstance(run, Predictor) else load_predictor(run)
    files, skipped = collect_images(inputs)
    unreadable: dict[str, str] = {}
    probabilities = classifier.probabilities(
        files, batch_size=batch_size, num_workers=num_workers, tta=tta, progress=progress, unreadable=unreadable
    )
    skipped += sorted(unreadable.items())
    files = [path for path in files if path not in unreadable]
    k = max(1, min(top_k, len(classifier.classes)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    predictions = [
        Prediction(path, [classifier.classes[i] for i in row], [float(probabilities[n, i]) for i in row])
        for n, (path, row) in enumerate(zip(files, order))
    ]
    return PredictionResult(predictions, skipped)
