"""Every phase's best weights judged on val and test, so the report can set the head on frozen
features against fine-tuning; the best phase's evaluation is the run's. The best phase then gets
its temperature and its unknown threshold, both fitted on the validation split.

Each phase is judged on the inputs it trained on where the run has them cached: the head on the
pooled features, the fine-tuned top on the boundary activations (float16, so its probabilities
can differ from the exported model's on images in the third decimal). Only a phase without
cached inputs reads the images again."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.cache.shards import CachedRows
from transferkit.data.index import DatasetIndex
from transferkit.inference.metrics import (
    compute_metrics,
    evaluation_from_probabilities,
    headline,
)
from transferkit.inference.predictor import create_forward, exact_float32, run_forward, softmax
from transferkit.models.create import PooledFeatures, classify_pooled
from transferkit.models.split import forward_top
from transferkit.run.records import RunMetrics
from transferkit.training.progress import PhaseProgress
from transferkit.trust.records import Rejection, Trust
from transferkit.trust.temperature import before_and_after, fit_calibration
from transferkit.trust.unknown import fit_rejection, training_bank, unknown_scores

log = logging.getLogger(__name__)

@dataclass
class PhaseInputs:
    """Where each split's pooled features come from for a phase: the cache it trained on, or the images."""

    index: DatasetIndex
    preprocessing: dict[str, Any]
    features: dict[str, torch.Tensor]
    boundary: int | None
    boundary_activations: dict[str, CachedRows] | None
    backend: str
    num_workers: int
    progress_bar: bool
    val_rows: np.ndarray | None = None
    """The validation rows with no near-copy in train (``clean_val_rows``), which the temperature and
    the threshold are fitted on; None: all of them."""

    def pooled(self, model: nn.Module, phase: str, split: str, rows: np.ndarray | None = None) -> torch.Tensor:
        """The pooled features of ``split`` (only ``rows`` of it, where given) under ``model``."""
        if phase == "frozen" and split in self.features:
            return self.features[split][slice(None) if rows is None else torch.from_numpy(rows)]
        if phase == "finetune" and self.boundary is not None and split in (self.boundary_activations or {}):
            cached = self.boundary_activations[split]  # type: ignore[index]
            return _top_pooled(model, cached, np.arange(len(cached)) if rows is None else rows, self.boundary)
        items = self.index.splits[split]
        paths = [path for path, _ in items] if rows is None else [items[row][0] for row in rows]
        if not paths:
            return torch.empty(0, model.num_features)
        forward = create_forward(PooledFeatures(model), self.preprocessing["input_size"], self.backend)
        outputs = run_forward(
            forward, paths, self.preprocessing, batch_size=64, num_workers=self.num_workers,
            progress=self.progress_bar, description=f"evaluate {split}",
        )
        return torch.from_numpy(outputs)


def evaluate_phases(
    model: nn.Module, progress: PhaseProgress, inputs: PhaseInputs, *, calibrate_on_val: bool,
    unknown_score: str, unknown_keep: float,
) -> tuple[RunMetrics, Trust]:
    """Judge each usable phase's best weights on val and test, fit the best phase's temperature
    and unknown threshold on val, and write the best phase's (calibrated) evaluations; ``model``
    is left with the best phase's weights. A phase's own headline metrics are uncalibrated: the
    temperature belongs to the saved model only."""
    index = inputs.index
    splits = [split for split in ("val", "test") if split in index.splits]
    best = progress.best_phase()
    phases = progress.usable()
    pooled: dict[str, torch.Tensor] = {}
    logits: dict[str, np.ndarray] = {}
    # The best phase goes last, so its weights are the ones left loaded.
    for name in sorted(phases, key=lambda name: name == best):
        progress.load(model, name)
        pooled = {split: inputs.pooled(model, name, split) for split in splits}
        logits = {split: _classify(model, pooled[split]) for split in splits}
        for split in splits:
            setattr(phases[name], split, headline(
                compute_metrics(softmax(logits[split]), index.targets(split), index.classes)
            ))
    trust = Trust()
    fit = inputs.val_rows if inputs.val_rows is not None else np.arange(len(index.splits.get("val", [])))
    if calibrate_on_val and len(logits.get("val", ())):
        trust.calibration = fit_calibration(logits["val"][fit], np.array(index.targets("val"))[fit], "val")
    if unknown_score != "none" and len(logits.get("val", ())):
        trust.rejection, trust.bank = _fit_rejection(model, best, inputs, unknown_score, unknown_keep,
                                                     logits["val"][fit] / trust.temperature,
                                                     pooled["val"][torch.from_numpy(fit)])
    metrics = RunMetrics(best_phase=best, phases=progress.phases)
    for split in splits:
        evaluation = evaluation_from_probabilities(
            split, index.classes, index.splits[split], softmax(logits[split] / trust.temperature)
        )
        if trust.rejection is not None:
            scores = unknown_scores(trust.rejection.method, torch.from_numpy(logits[split] / trust.temperature),
                                              pooled[split], trust.bank)
            evaluation.judge_unknown(scores.numpy(), trust.rejection.as_dict())
        if trust.calibration is not None:
            evaluation.metrics["calibration"] = before_and_after(
                softmax(logits[split]), evaluation.targets, trust.temperature, trust.calibration.fitted_on
            )
        evaluation.write(progress.folder.writable(progress.folder.evaluation_dir(split)))
        metrics.splits[split] = headline(evaluation.metrics)
    return metrics, trust


def _fit_rejection(
    model: nn.Module, phase: str, inputs: PhaseInputs, method: str, keep: float,
    val_logits: np.ndarray, val_pooled: torch.Tensor,
) -> tuple[Rejection, torch.Tensor | None]:
    bank = None
    if method == "knn":
        bank = training_bank(np.array(inputs.index.targets("train")),
                                       lambda rows: inputs.pooled(model, phase, "train", rows))
    found = fit_rejection(method, keep, torch.from_numpy(val_logits), val_pooled, bank, "val")
    return found, bank


def _classify(model: nn.Module, pooled: torch.Tensor) -> np.ndarray:
    device = next(model.parameters()).device
    with torch.inference_mode(), exact_float32(device):
        return classify_pooled(model.eval(), pooled.to(device), 0.0).float().cpu().numpy()


def _top_pooled(
    model: nn.Module, cached: CachedRows, rows: np.ndarray, boundary: int, batch_size: int = 64
) -> torch.Tensor:
    """The pooled features of ``cached``'s ``rows``, a batch read from the cache at a time."""
    # Judging a phase on images may have moved the model to the GPU; the cache is on the CPU.
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode(), exact_float32(device):
        return torch.cat([
            forward_top(model, cached[rows[start : start + batch_size]].to(device).float(), boundary,
                                    pre_logits=True).cpu()
            for start in range(0, len(rows), batch_size)
        ]) if len(rows) else torch.empty(0, model.num_features)
