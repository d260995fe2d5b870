"""The check every exported file passes before it is kept: run in its own runtime over the run's
validation split, against the eager PyTorch model it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from transferkit.errors import TransferkitError


class ExportCheckError(TransferkitError):
    """The exported file disagrees with its model by more than allowed; no file is left behind."""


@dataclass
class Parity:
    images: int
    """Validation images the file was run on."""
    max_abs_diff: float
    """Largest difference of any class probability between the file and the eager model."""
    accuracy: float
    reference_accuracy: float
    """The eager float model's accuracy on the same images."""
    max_score_diff: float | None = None
    """Largest difference of the unknown score, where the model has one."""
    unknown_agreement: float | None = None
    """Share of the images the file and the eager model both answer unknown, or both answer a class,
    each with its own threshold."""
    threshold: float | None = None
    """The file's unknown threshold, fitted on its own validation scores."""
    reference_threshold: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def accuracy_change(self) -> float:
        return self.accuracy - self.reference_accuracy


def compare(
    expected: np.ndarray, expected_scores: np.ndarray | None, actual: np.ndarray, actual_scores: np.ndarray | None,
    targets: np.ndarray, reference_threshold: float | None = None, threshold: float | None = None,
) -> Parity:
    """The agreement of the file's outputs (``actual``) with the eager model's (``expected``)."""
    images = len(targets)
    scored = expected_scores is not None and actual_scores is not None and images > 0
    agreement = None
    if scored and reference_threshold is not None and threshold is not None:
        agreement = float(np.mean((actual_scores > threshold) == (expected_scores > reference_threshold)))
    return Parity(
        images=images,
        max_abs_diff=float(np.abs(actual - expected).max()) if images else 0.0,
        accuracy=float((actual.argmax(axis=1) == targets).mean()) if images else float("nan"),
        reference_accuracy=float((expected.argmax(axis=1) == targets).mean()) if images else float("nan"),
        max_score_diff=float(np.abs(actual_scores - expected_scores).max()) if scored else None,
        unknown_agreement=agreement, threshold=threshold, reference_threshold=reference_threshold,
    )


def refit_unknown(record: dict[str, Any], scores: np.ndarray) -> dict[str, Any]:
    """The unknown record with its threshold fitted again on the file's own ``scores`` (the same
    validation images the model's threshold was fitted on), so that the file as shipped keeps the
    share of real images it promises: a quantised file's scores move by more than the gap the
    eager threshold left."""
    from transferkit.trust.unknown import fit_threshold

    threshold, kept = fit_threshold(scores, float(record["keep"]))
    return {**record, "threshold": threshold, "kept": kept, "images": int(len(scores))}


def check_accuracy(parity: Parity, max_drop: float, what: str) -> None:
    """One line, raised, when the file's accuracy is more than ``max_drop`` points below the model's."""
    drop = 100 * (parity.reference_accuracy - parity.accuracy)
    if drop > max_drop:
        raise ExportCheckError(
            f"{what} scored {parity.accuracy:.4f} on {parity.images} validation images against the model's "
            f"{parity.reference_accuracy:.4f} ({drop:.1f} points less, more than --max-accuracy-drop {max_drop:g}); "
            "no file was written"
        )
