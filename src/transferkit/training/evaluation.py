"""Every phase's best weights judged on val and test, so the report can set the head on frozen
features against fine-tuning; the best phase's evaluation is the run's.

Each phase is judged on the inputs it trained on where the run has them cached: the head on the
pooled features, the fine-tuned top on the boundary activations (float16, so its probabilities
can differ from the exported model's on images in the third decimal). Only a phase without
cached inputs reads the images again."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transferkit import activations, models
from transferkit.data.folders import DatasetIndex
from transferkit.metrics import compute_metrics, evaluation_from_probabilities, headline
from transferkit.inference import create_forward, run_forward, softmax
from transferkit.records import RunMetrics
from transferkit.training.progress import PhaseProgress


def evaluate_phases(
    model: nn.Module,
    progress: PhaseProgress,
    index: DatasetIndex,
    preprocessing: dict[str, Any],
    features: dict[str, torch.Tensor],
    *,
    boundary: int | None = None,
    boundary_activations: dict[str, torch.Tensor] | None = None,
    backend: str,
    num_workers: int,
    progress_bar: bool,
) -> RunMetrics:
    """Judge each usable phase's best weights on val and test and write the best phase's
    evaluations; ``model`` is left with the best phase's weights. The frozen phase is judged on
    its cached ``features`` where it has them, the fine-tuned phase on ``boundary_activations``
    (the activations at ``boundary``) where it has them."""
    splits = [split for split in ("val", "test") if split in index.splits]
    best = progress.best_phase()
    phases = progress.usable()

    def logits(split: str, phase: str) -> torch.Tensor:
        if phase == "frozen" and split in features:
            with torch.inference_mode():
                return models.classify_pooled(model.eval(), features[split], 0.0)
        if phase == "finetune" and boundary is not None and split in (boundary_activations or {}):
            return _top_logits(model, boundary_activations[split], boundary)  # type: ignore[index]
        items = index.splits[split]
        if not items:
            return torch.empty(0)
        forward = create_forward(model, preprocessing["input_size"], backend)
        outputs = run_forward(
            forward, [path for path, _ in items], preprocessing, batch_size=64, num_workers=num_workers,
            progress=progress_bar, description=f"evaluate {split}",
        )
        return torch.from_numpy(outputs)

    probabilities: dict[str, dict[str, Any]] = {}
    # The best phase goes last, so its weights are the ones left loaded.
    for name in sorted(phases, key=lambda name: name == best):
        progress.load(model, name)
        probabilities[name] = {split: softmax(logits(split, name).numpy()) for split in splits}
        for split in splits:
            setattr(phases[name], split, headline(
                compute_metrics(probabilities[name][split], index.targets(split), index.classes)
            ))
    metrics = RunMetrics(best_phase=best, phases=progress.phases)
    for split in splits:
        evaluation = evaluation_from_probabilities(
            split, index.classes, index.splits[split], probabilities[best][split]
        )
        evaluation.write(progress.folder.evaluation_dir(split))
        metrics.splits[split] = headline(evaluation.metrics)
    return metrics


def _top_logits(model: nn.Module, cached: torch.Tensor, boundary: int, batch_size: int = 64) -> torch.Tensor:
    # Judging a phase on images may have moved the model to the GPU; the cache is on the CPU.
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        return torch.cat([
            activations.forward_top(model, cached[start : start + batch_size].to(device).float(), boundary).cpu()
            for start in range(0, len(cached), batch_size)
        ]) if len(cached) else torch.empty(0)
