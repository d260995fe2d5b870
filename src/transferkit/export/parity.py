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
    temperature: float | None = None
    """The temperature the file's probabilities imply (``implied_temperature``), where the model has one."""
    reference_temperature: float | None = None
    """The temperature the model was calibrated with, which the file must apply."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def accuracy_change(self) -> float:
        return self.accuracy - self.reference_accuracy


def compare(
    expected: np.ndarray, expected_scores: np.ndarray | None, actual: np.ndarray, actual_scores: np.ndarray | None,
    targets: np.ndarray, reference_threshold: float | None = None, threshold: float | None = None,
    reference_temperature: float | None = None,
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
        temperature=implied_temperature(expected, actual, reference_temperature) if reference_temperature else None,
        reference_temperature=reference_temperature,
    )


def implied_temperature(expected: np.ndarray, actual: np.ndarray, temperature: float) -> float:
    """The temperature the file's probabilities ``actual`` were divided by, read against the eager
    model's calibrated ``expected`` (divided by ``temperature``): each row's centred log
    probabilities are its logits over the temperature, so the file's are the model's times
    ``temperature / implied`` (a least-squares fit over every row; rows with a probability under
    1e-6 are left out, where float32 rounding dwarfs the logits)."""
    usable = (expected.min(axis=1) > 1e-6) & (actual.min(axis=1) > 1e-6) if len(expected) else np.zeros(0, bool)
    model = np.log(expected[usable].astype(np.float64))
    model -= model.mean(axis=1, keepdims=True)
    file = np.log(actual[usable].astype(np.float64))
    file -= file.mean(axis=1, keepdims=True)
    spread = float((model * model).sum())
    if spread == 0:
        return temperature  # every usable row is flat: any temperature gives these probabilities
    return temperature * spread / float((file * model).sum())


def refit_unknown(record: dict[str, Any], scores: np.ndarray) -> dict[str, Any]:
    """The unknown record with its threshold fitted again on the file's own ``scores`` (the same
    validation images the model's threshold was fitted on), so that the file as shipped keeps the
    share of real images it promises: a quantised file's scores move by more than the gap the
    eager threshold left."""
    from transferkit.trust.unknown import fit_threshold

    threshold, kept = fit_threshold(scores, float(record["keep"]))
    return {**record, "threshold": threshold, "kept": kept, "images": int(len(scores))}


TEMPERATURE_TOLERANCE = 0.1
"""How far (as a ratio, 10%) a float file's implied temperature may stray from the model's: a
float file agrees with its model to about 1e-6, so its implied temperature is the model's."""


def check_temperature(parity: Parity, what: str, quantized: bool = False) -> None:
    """One line, raised, when the file does not apply the model's temperature: accuracy cannot tell
    (a temperature keeps every top class), so a file without it would pass with wrong probabilities.

    A ``quantized`` file's logits shrink or grow with int8's rounding (by 30% on the tiny test
    model, under 1% on tf_flowers: benchmarks/RESULTS.md), so it is refused only where its implied
    temperature is nearer none (1) than the model's."""
    implied, model = parity.temperature, parity.reference_temperature
    if implied is None or model is None:
        return
    off = abs(np.log(implied / model))
    within = off <= np.log1p(TEMPERATURE_TOLERANCE)  # a model near 1 leaves int8 no room to be nearer it
    wrong = not within and (off > abs(np.log(implied)) if quantized else True)
    if wrong:
        raise ExportCheckError(
            f"{what} gives probabilities as if divided by a temperature of {implied:.3f}, not the "
            f"model's {model:.3f} (on {parity.images} validation images), so its "
            "probabilities are not the calibrated ones; no file was written"
        )


PROBABILITY_MOVE_WARNING = 0.25
"""A class probability moved by more than this can change a top class between two close ones."""

AGREEMENT_WARNING = 0.98
"""Below this share of images answering unknown alike, the file's "none of these" is not the model's."""


def moved_warning(parity: Parity, what: str) -> str | None:
    """One line for a file whose answers a user could see differ from the model's, or None."""
    agreement = parity.unknown_agreement
    if parity.max_abs_diff <= PROBABILITY_MOVE_WARNING and (agreement is None or agreement >= AGREEMENT_WARNING):
        return None
    unknown = f", and its unknown answer agrees on {agreement:.1%}" if agreement is not None else ""
    return (f"{what} moves a class probability by up to {parity.max_abs_diff:.2f} against the model{unknown} "
            f"(of {parity.images} validation images); where single answers matter, ship the float file "
            "(export without --quantize); --max-accuracy-drop refuses only a file that loses accuracy")


def check_accuracy(parity: Parity, max_drop: float, what: str) -> None:
    """One line, raised, when the file's accuracy is more than ``max_drop`` points below the model's."""
    drop = 100 * (parity.reference_accuracy - parity.accuracy)
    if drop > max_drop:
        raise ExportCheckError(
            f"{what} scored {parity.accuracy:.4f} on {parity.images} validation images against the model's "
            f"{parity.reference_accuracy:.4f} ({drop:.1f} points less, more than --max-accuracy-drop {max_drop:g}); "
            "no file was written"
        )
