"""The unknown answer ("none of these"): a score of how unlike the training images an image is, and a threshold on it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.models.create import classify_pooled, forward_pooled
from transferkit.trust.records import METHODS, Rejection, Trust

NEIGHBOURS = 10


BANK_SIZE = 5000
"""Training images whose features ``knn`` keeps (all of them below this); 5,000 x 1,280 float32
features is 26 MB, and Sun et al. found a random 1% of ImageNet's training set enough."""


def unknown_scores(
    method: str, logits: torch.Tensor, pooled: torch.Tensor | None = None, bank: torch.Tensor | None = None,
    neighbours: int = NEIGHBOURS,
) -> torch.Tensor:
    """The score of each row, higher for less familiar images. ``logits`` are calibrated (divided
    by the temperature); ``bank`` holds the training images' L2-normalised pooled features."""
    if method == "msp":
        return 1 - torch.softmax(logits, dim=1).max(dim=1).values
    if method == "energy":
        return -torch.logsumexp(logits, dim=1)
    if method == "knn":
        if pooled is None or bank is None:
            raise ValueError("the knn score needs the pooled features and the training features")
        similarity = F.normalize(pooled.float(), dim=1) @ bank.T
        return 1 - similarity.topk(min(neighbours, bank.shape[0]), dim=1).values[:, -1]
    raise ValueError(f"unknown score {method!r}; choose one of {', '.join(METHODS)}")


def fit_threshold(scores: np.ndarray, keep: float) -> tuple[float, float]:
    """(threshold, share of ``scores`` at or below it): halfway between the smallest score that
    ``keep`` of them do not exceed and the next higher finite score (that score itself where
    there is none). On that score, the image that has it would be answered unknown by any
    rounding upwards (an exported model, another CPU, the float16 activations a fine-tuned top
    was judged on); halfway, a rounding smaller than half the gap changes no answer."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return float("inf"), 1.0
    edge = float(np.quantile(scores, keep, method="inverted_cdf"))
    above = scores[(scores > edge) & np.isfinite(scores)]
    threshold = (edge + float(above.min())) / 2 if len(above) else edge
    return threshold, float((scores <= threshold).mean())


def fit_rejection(
    method: str, keep: float, logits: torch.Tensor, pooled: torch.Tensor, bank: torch.Tensor | None, fitted_on: str,
) -> Rejection:
    """The threshold that keeps ``keep`` of these held-out images (calibrated ``logits``, ``pooled``
    features), as a Rejection record."""
    scores = unknown_scores(method, logits, pooled, bank).numpy()
    threshold, kept = fit_threshold(scores, keep)
    return Rejection(
        method=method, threshold=threshold, keep=keep, kept=kept, fitted_on=fitted_on, images=len(scores),
        neighbours=NEIGHBOURS if method == "knn" else None, bank_images=len(bank) if method == "knn" and bank is not None else None,
    )


def bank_indices(targets: np.ndarray, size: int = BANK_SIZE, seed: int = 0) -> np.ndarray:
    """At most ``size`` training images, a random sample in each class's own proportion, and at
    least one of every class (scikit-learn's stratified split refuses a class of one image)."""
    targets = np.asarray(targets)
    if len(targets) <= size:
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(targets):
        rows = np.flatnonzero(targets == label)
        share = max(1, round(size * len(rows) / len(targets)))
        chosen.append(rng.choice(rows, size=min(share, len(rows)), replace=False))
    return np.sort(np.concatenate(chosen))


def normalized_bank(pooled: torch.Tensor) -> torch.Tensor:
    return F.normalize(pooled.float(), dim=1).contiguous()


def training_bank(targets: np.ndarray, pooled_of: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor:
    """The knn score's training features: ``pooled_of(rows)`` of a stratified sample of the
    training images (``bank_indices``), normalised."""
    return normalized_bank(pooled_of(bank_indices(targets)))


class ScoredClassifier(nn.Module):
    """A classifier whose forward gives (logits / temperature, unknown score), or the logits
    alone without a ``method``: one graph for eager inference and every export."""

    def __init__(
        self, model: nn.Module, temperature: float = 1.0, method: str | None = None,
        bank: torch.Tensor | None = None, neighbours: int = NEIGHBOURS,
    ):
        super().__init__()
        self.model = model
        self.method = method
        self.neighbours = neighbours
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("bank", bank if bank is not None else torch.zeros(0))

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits",) if self.method is None else ("logits", "unknown_score")

    def extra_repr(self) -> str:
        # The export cache names a graph by its repr and tensors: two scores on the same weights differ here.
        return f"method={self.method}, neighbours={self.neighbours}"

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pooled = forward_pooled(self.model, images)
        logits = classify_pooled(self.model, pooled, 0.0) / self.temperature
        if self.method is None:
            return logits
        return logits, unknown_scores(self.method, logits, pooled, self.bank, self.neighbours)


def scored_classifier(model: nn.Module, trust: Trust) -> nn.Module:
    """``model`` with its temperature and unknown score in the graph (see ``ScoredClassifier``)."""
    method = trust.rejection.method if trust.rejection else None
    neighbours = trust.rejection.neighbours if trust.rejection and trust.rejection.neighbours else 1
    return ScoredClassifier(model, trust.temperature, method, trust.bank, neighbours).eval()


