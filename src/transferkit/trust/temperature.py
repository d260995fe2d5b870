"""Temperature scaling (Guo et al. 2017): one scalar ``T`` that divides the logits so that the
softmax's confidence matches the accuracy, fitted by log loss on held-out labelled images.

Dividing every logit by the same positive number never changes which class is on top, so
accuracy is untouched; only how sure the model says it is changes. A model trained with label
smoothing is under-confident (``T < 1`` sharpens it); an over-fitted one is over-confident
(``T > 1`` softens it).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from transferkit.inference.metrics import expected_calibration_error, reliability_bins, softmax
from transferkit.models.metadata import Record

log = logging.getLogger(__name__)

LOG_TEMPERATURE_BOUNDS = (-5.0, 5.0)
"""T between e^-5 and e^5 (0.007 to 148): far beyond any temperature a trained classifier needs;
a fit at the edge means the held-out set cannot say anything (e.g. every image right with
confidence 1)."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def mean_log_loss(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    targets = np.asarray(targets, dtype=np.int64)
    return float(-log_softmax(np.asarray(logits, dtype=np.float64) / temperature)[np.arange(len(targets)), targets].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature that minimises the mean log loss of ``targets`` under softmax(logits / T).

    The loss is smooth and unimodal in log T, so a bounded Brent search on log T finds the
    minimum to 1e-6 in a few dozen evaluations (L-BFGS on T itself, as in the paper's code, can
    step below zero).
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0:
        return 1.0
    found = minimize_scalar(
        lambda log_t: mean_log_loss(logits, targets, float(np.exp(log_t))),
        bounds=LOG_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-6},
    )
    if min(abs(found.x - bound) for bound in LOG_TEMPERATURE_BOUNDS) < 1e-3:
        log.warning(
            "the %d held-out images cannot set a temperature (the log loss keeps falling toward T=%.3g: "
            "every image is right with a wide margin, or wrong); keeping T=1", len(logits), np.exp(found.x),
        )
        return 1.0
    return float(np.exp(found.x))


@dataclass
class Calibration:
    """A fitted temperature and what it changed on the images it was fitted on."""

    temperature: float
    fitted_on: str
    """Which labelled images: a run's split name, or a folder."""
    images: int
    ece_before: float
    ece_after: float
    log_loss_before: float
    log_loss_after: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any, name: str = "calibration") -> Calibration:
        """The record as a model file holds it at ``name``; a ``FieldError`` names the first value
        that cannot be (a temperature outside the fit's own bounds would scale every logit wrong)."""
        record = Record(values, name)
        # The fit returns e^-5 to e^5 and json keeps a float exactly; the slack is for other writers.
        low, high = np.exp(LOG_TEMPERATURE_BOUNDS) * (1 - 1e-9, 1 + 1e-9)
        return cls(
            temperature=record.number("temperature", low, high, f"a number from {low:.4g} to {high:.4g}"),
            fitted_on=record.text("fitted_on"),
            images=record.count("images"),  # type: ignore[arg-type]  # not optional: never None
            ece_before=record.number("ece_before", 0, 1, "a number from 0 to 1"),
            ece_after=record.number("ece_after", 0, 1, "a number from 0 to 1"),
            log_loss_before=record.number("log_loss_before", 0, expected="a finite number of at least 0"),
            log_loss_after=record.number("log_loss_after", 0, expected="a finite number of at least 0"),
        )


def uncalibrated_probabilities(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before the temperature, from the calibrated ones: softmax(T log p)
    equals softmax(logits), since log p is logits / T less a constant per row."""
    return softmax(temperature * np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-300, None)))


def before_and_after(uncalibrated: np.ndarray, targets: np.ndarray, temperature: float, fitted_on: str) -> dict[str, Any]:
    """An evaluation's record of its temperature and of its calibration without it, so a reader
    sees before and after on the same images (the metrics themselves are after)."""
    bins = reliability_bins(uncalibrated, np.asarray(targets, dtype=np.int64))
    return {
        "temperature": temperature, "fitted_on": fitted_on,
        "uncalibrated_expected_calibration_error": expected_calibration_error(bins), "uncalibrated_reliability": bins,
    }


def fit_calibration(logits: np.ndarray, targets: np.ndarray, fitted_on: str) -> Calibration:
    """Fit the temperature on (logits, targets) and measure the expected calibration error
    (15 equal-width bins, as in metrics) and the log loss before and after."""
    targets = np.asarray(targets, dtype=np.int64)
    temperature = fit_temperature(logits, targets)

    def ece(t: float) -> float:
        return expected_calibration_error(reliability_bins(softmax(np.asarray(logits) / t), targets))

    return Calibration(
        temperature=temperature, fitted_on=fitted_on, images=int(len(targets)),
        ece_before=ece(1.0), ece_after=ece(temperature),
        log_loss_before=mean_log_loss(logits, targets), log_loss_after=mean_log_loss(logits, targets, temperature),
    )
