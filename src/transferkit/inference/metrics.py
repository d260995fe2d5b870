"""Metrics of a classifier's predictions on labelled images.

``compute_metrics`` works on (probabilities, targets) alone, so training, ``evaluate`` and
``compare`` report the same numbers computed the same way. Where scikit-learn has a metric,
it computes it; the tests hold every number against scikit-learn on the same predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import write_csv, write_json
from transferkit.run.folder import evaluation_files

TOP_K = (3, 5)
CALIBRATION_BINS = 15
MOST_CONFUSED = 10
HIGHEST_LOSS = 16
PREDICTION_COLUMNS = ["path", "label", "predicted", "confidence", "label_probability", "loss", "unknown_score", "unknown"]
"""``unknown_score`` and ``unknown`` (true: the image is answered "none of these") are empty for a model without a score."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 and returned as float32."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


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


def unknown_share(rejected: np.ndarray, unknown: dict[str, Any]) -> dict[str, Any]:
    """How many of these labelled (so in-distribution) images the model answers unknown
    (``rejected``, one bool an image), under its unknown record (method, threshold)."""
    return {"method": unknown["method"], "threshold": unknown["threshold"], "images": int(len(rejected)),
            "unknown": int(rejected.sum()), "kept": float(1 - rejected.mean()) if len(rejected) else 1.0}


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
        "most_confused": _most_confused(confusion, classes),
        "reliability": bins,
    }
    if paths is not None:
        result["highest_loss"] = _highest_loss(paths, classes, targets, probabilities, label_probability, losses)
    return result


def _most_confused(confusion: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """The most frequent (label, predicted) mistakes, most first, ties in class order."""
    labels = range(len(classes))
    off_diagonal = [
        (int(confusion[t, p]), t, p) for t in labels for p in labels if t != p and confusion[t, p] > 0
    ]
    off_diagonal.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [{"label": classes[t], "predicted": classes[p], "count": count} for count, t, p in off_diagonal[:MOST_CONFUSED]]


def _highest_loss(
    paths: list[str], classes: list[str], targets: np.ndarray, probabilities: np.ndarray,
    label_probability: np.ndarray, losses: np.ndarray,
) -> list[dict[str, Any]]:
    """The images with the highest log loss, highest first."""
    predictions = probabilities.argmax(axis=1)
    return [
        {
            "path": paths[i],
            "label": classes[targets[i]],
            "predicted": classes[predictions[i]],
            "confidence": float(probabilities[i, predictions[i]]),
            "label_probability": float(label_probability[i]),
            "loss": float(losses[i]),
        }
        for i in np.argsort(-losses, kind="stable")[:HIGHEST_LOSS]
    ]


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
    unknown_scores: np.ndarray | None = None
    """Each image's unknown score; None for a model without one."""
    unknown: np.ndarray | None = None
    """Whether each image is answered unknown (its score above the model's threshold)."""

    def judge_unknown(self, scores: np.ndarray, record: dict[str, Any]) -> None:
        """Each image's unknown score and answer under the model's unknown ``record``, and their share in the metrics."""
        self.unknown_scores = np.asarray(scores, dtype=np.float64)
        self.unknown = self.unknown_scores > record["threshold"]
        self.metrics["unknown"] = unknown_share(self.unknown, record)
        answered = dict(zip(self.paths, self.unknown.tolist()))
        for row in self.metrics.get("highest_loss", []):  # so the report's grid can mark the abstentions
            row["unknown"] = answered[row["path"]]

    def __repr__(self) -> str:
        shown = ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                          for key, value in headline(self.metrics).items() if key in ("images", "accuracy", "macro_f1"))
        return f"Evaluation({self.name!r}: {shown}{f', written to {self.output}' if self.output else ''})"

    def to_pandas(self) -> Any:
        """One row per image: its path, label, prediction, confidence, loss, unknown score and answer
        (None without a score) and every class's probability."""
        import pandas as pd

        predicted = self.probabilities.argmax(axis=1)
        label_probability, losses = label_losses(self.probabilities, self.targets)
        table = pd.DataFrame({
            "path": self.paths, "label": [self.classes[t] for t in self.targets],
            "predicted": [self.classes[p] for p in predicted], "confidence": self.probabilities.max(axis=1),
            "label_probability": label_probability, "loss": losses,
            "unknown_score": self.unknown_scores, "unknown": self.unknown,
        })
        return table.join(pd.DataFrame(self.probabilities, columns=[f"p_{name}" for name in self.classes]))

    def _repr_html_(self) -> str:
        """Jupyter's view: the headline metrics and the confusion matrix (rows: label, columns: prediction)."""
        from transferkit._notebook import facts_table, rows_table, view

        facts = [(key, value) for key, value in headline(self.metrics).items() if value not in (None, {})]
        matrix = [[name, *counts] for name, counts in zip(self.classes, self.metrics.get("confusion_matrix", []))]
        return view(f"Evaluation on {self.name}", facts_table(facts),
                    "<p>Confusion matrix (rows: label, columns: prediction)</p>",
                    rows_table(["", *self.classes], matrix, shown=len(matrix)))

    def write(self, folder: Path) -> None:
        """The metrics and the predictions (one row per image) in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        metrics_file, predictions_file = evaluation_files(folder)
        write_json(metrics_file, {"name": self.name, "skipped": len(self.skipped), **self.metrics})
        predictions = self.probabilities.argmax(axis=1)
        label_probability, losses = label_losses(self.probabilities, self.targets)

        scores = [""] * len(self.paths) if self.unknown_scores is None else [f"{s:.6f}" for s in self.unknown_scores]
        answers = [""] * len(self.paths) if self.unknown is None else ["true" if u else "false" for u in self.unknown]
        rows = (
            [path, self.classes[label], self.classes[predicted], f"{row[predicted]:.6f}", f"{probability:.6f}",
             f"{loss:.6f}", score, answer]
            for path, label, predicted, row, probability, loss, score, answer in zip(
                self.paths, self.targets, predictions, self.probabilities, label_probability, losses, scores, answers
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
