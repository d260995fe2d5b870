"""The architecture of a run's model (or of any timm model as transferkit would train it), layer
by layer: type, output shape, parameters, and in which phase each part trains.

The phases are applied with the same freezing functions training uses, so the trainable counts
are what the run trains (a test holds them against the counts the run logged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit._io import write_text
from transferkit.errors import WeightsUnavailableError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

    from transferkit.config import PhaseConfig

TRAINS_IN = {
    "both": "both phases",
    "finetune": "fine-tuning",
    "frozen": "frozen",
    "partly": "partly",
    "none": "-",
}
COLOURS = {"both": "#1b9e55", "finetune": "#7aa7ef", "frozen": "#b8b8b8", "partly": "#c3d6f6", "none": "#eeeeee"}


@dataclass
class LayerRow:
    name: str
    type: str
    depth: int
    output_shape: tuple[int, ...] | None
    parameters: int
    trains_in: str
    """A key of TRAINS_IN: 'both' (head), 'finetune', 'frozen', 'partly' or 'none' (no parameters)."""
    leaf: bool
    """No listed row below it: the rows with leaf=True partition the model."""


@dataclass
class ModelSummary:
    model: str
    input_size: tuple[int, ...]
    rows: list[LayerRow]
    total_parameters: int
    trainable: dict[str, int] = field(default_factory=dict)
    """Trainable parameters per phase that runs: {'frozen': ..., 'finetune': ...}."""

    def table(self) -> str:
        name_width = max(len("  " * (r.depth - 1) + r.name) for r in self.rows)
        type_width = max(len(r.type) for r in self.rows)
        header = f"{'layer':<{name_width}}  {'type':<{type_width}}  {'output shape':<18}  {'parameters':>12}  trains in"
        lines = [f"{self.model}, input {'x'.join(map(str, self.input_size))}", "", header, "-" * len(header)]
        for row in self.rows:
            shape = "x".join(map(str, row.output_shape)) if row.output_shape else ""
            indented = "  " * (row.depth - 1) + row.name
            lines.append(
                f"{indented:<{name_width}}  {row.type:<{type_width}}  {shape:<18}  {row.parameters:>12,}  {TRAINS_IN[row.trains_in]}"
            )
        lines += ["-" * len(header), f"total parameters: {self.total_parameters:,}"]
        for phase, count in self.trainable.items():
            label = "frozen-features phase" if phase == "frozen" else "fine-tuning phase"
            lines.append(f"trainable in the {label}: {count:,} ({100 * count / self.total_parameters:.1f}%)")
        return "\n".join(lines)


def _load(source: str, num_classes: int) -> tuple[nn.Module, dict[str, Any], dict[str, PhaseConfig]]:
    """(model, preprocessing, phases) from a run folder, or a model name with the default recipe
    (whose ``--finetune-unfreeze auto`` is then that of a training set under 4,000 images)."""
    from dataclasses import replace

    from transferkit.config import ModelConfig, default_finetune_phase, default_frozen_phase
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.inference.loading import load_run_model
    from transferkit.models.create import create_classifier
    from transferkit.run.folder import RunFolder

    folder = RunFolder(source)
    if folder.is_run():  # a run without its model yet is refused with why, not taken for a model name
        model, classifier = load_run_model(folder.root)
        config = folder.read_config()
        finetune, metrics = config.finetune, folder.read_metrics()
        trained = metrics.phases.get("finetune") if metrics else None
        if trained and trained.trained_blocks:  # the count the run recorded, which auto chose by its data
            finetune = replace(finetune, unfreeze=str(trained.trained_blocks))
        return model, classifier.preprocessing, {"frozen": config.frozen, "finetune": finetune}
    try:
        model = create_classifier(ModelConfig(name=source), num_classes)
    except WeightsUnavailableError:
        # The architecture is all a summary needs; weights that cannot be had change nothing in it.
        model = create_classifier(ModelConfig(name=source, weights="none"), num_classes)
    return model.eval(), resolve_preprocessing(model), {"frozen": default_frozen_phase(), "finetune": default_finetune_phase()}


def _output_shapes(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    import torch

    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        def record(_module: Any, _inputs: Any, output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape[1:])

        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _trainable_names(model: nn.Module, phase: str, unfreeze: str) -> set[str]:
    from transferkit.config import parse_unfreeze
    from transferkit.models.freeze import freeze_backbone, unfreeze_top

    if phase == "frozen":
        freeze_backbone(model)
    else:
        unfreeze_top(model, parse_unfreeze(unfreeze))
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for parameter in model.parameters():
        parameter.requires_grad = False
    return names


def _block_depth(model: nn.Module) -> int:
    """How deep the blocks that fine-tuning unfreezes sit (blocks.5.3 is 3, layer4.1 is 2)."""
    from transferkit.models.freeze import backbone_blocks

    deepest = 1
    for names in backbone_blocks(model):
        paths = [name.split(".")[:-1] for name in names]
        common = 0
        while all(len(p) > common and p[common] == paths[0][common] for p in paths):
            common += 1
        deepest = max(deepest, common)
    return deepest


def summarize(source: str | os.PathLike[str], depth: int | None = None, num_classes: int = 1000) -> ModelSummary:
    """Summary of a run's model, or of the timm model ``source`` with a ``num_classes`` head
    trained with the default recipe. ``depth`` is how many levels of sub-modules to list;
    by default, down to the blocks fine-tuning unfreezes one by one."""
    model, preprocessing, phase_configs = _load(str(source), num_classes)
    depth = depth or _block_depth(model)
    input_size = tuple(preprocessing["input_size"])
    shapes = _output_shapes(model, input_size)
    phases = {name: phase for name, phase in phase_configs.items() if phase.epochs > 0}
    trainable = {name: _trainable_names(model, name, phase.unfreeze) for name, phase in phases.items()}
    frozen_set, finetune_set = trainable.get("frozen", set()), trainable.get("finetune", set())

    def trains_in(parameter_names: list[str]) -> str:
        if not parameter_names:
            return "none"
        kinds = {
            "both" if n in frozen_set and n in finetune_set else
            "finetune" if n in finetune_set else
            "frozen" if n not in frozen_set else "frozen-only"
            for n in parameter_names
        }
        return kinds.pop() if len(kinds) == 1 and "frozen-only" not in kinds else "partly"

    # Parameter-free helpers inside a layer (its activation, an Identity) would only add noise.
    listed = [
        (name, module) for name, module in model.named_modules()
        if name and name.count(".") < depth and ("." not in name or any(True for _ in module.parameters()))
    ]
    listed_names = {name for name, _ in listed}
    rows = []
    for name, module in listed:
        parameter_names = [f"{name}.{n}" for n, _ in module.named_parameters()]
        has_listed_child = any(f"{name}.{child}" in listed_names for child, _ in module.named_children())
        rows.append(LayerRow(
            name=name, type=type(module).__name__, depth=name.count(".") + 1, output_shape=shapes.get(name),
            parameters=sum(p.numel() for p in module.parameters()), trains_in=trains_in(parameter_names),
            leaf=not has_listed_child,
        ))
    return ModelSummary(
        model=str(getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__),
        input_size=input_size,
        rows=rows,
        total_parameters=sum(p.numel() for p in model.parameters()),
        trainable={name: sum(p.numel() for n, p in model.named_parameters() if n in names) for name, names in trainable.items()},
    )


def plot_architecture(summary: ModelSummary, columns_of: int = 30) -> Figure:
    """The model as a chain of boxes, input at the top, one per listed leaf row, coloured by the
    phase that trains it; long chains wrap into columns."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch, Patch

    boxes = [("input", "x".join(map(str, summary.input_size)), "", "none")]
    for row in summary.rows:
        if row.leaf:
            shape = "x".join(map(str, row.output_shape)) if row.output_shape else ""
            boxes.append((row.name, row.type, f"{shape}   {row.parameters:,} params" if row.parameters else shape, row.trains_in))
    columns = -(-len(boxes) // columns_of)
    per_column = -(-len(boxes) // columns)
    figure = Figure(figsize=(4.6 * columns, 0.55 * per_column + 1.2))
    axes = figure.subplots()
    axes.set_xlim(0, columns)
    axes.set_ylim(per_column + 0.2, -0.9)
    axes.axis("off")
    for index, (name, kind, detail, phase) in enumerate(boxes):
        column, position = divmod(index, per_column)
        x = column + 0.05
        axes.add_patch(FancyBboxPatch((x, position - 0.4), 0.9, 0.8, boxstyle="round,pad=0.01,rounding_size=0.08",
                                      facecolor=COLOURS[phase], edgecolor="#555555", linewidth=0.6))
        axes.text(x + 0.03, position - 0.08, f"{name}  ({kind})", fontsize=7.5, va="center", weight="bold")
        axes.text(x + 0.03, position + 0.2, detail, fontsize=7, va="center", color="#222222")
        if position + 1 < per_column and index + 1 < len(boxes):
            axes.annotate("", (x + 0.45, position + 0.6), (x + 0.45, position + 0.4), arrowprops={"arrowstyle": "->", "lw": 0.6})
    axes.set_title(f"{summary.model}: {summary.total_parameters:,} parameters", fontsize=10)
    used = {phase for *_, phase in boxes} - {"none"}
    axes.legend(handles=[Patch(facecolor=COLOURS[p], label=f"trains in: {TRAINS_IN[p]}") for p in COLOURS if p in used],
                loc="lower center", bbox_to_anchor=(0.5, 1.02 + 0.4 / per_column), ncol=4, fontsize=7, frameon=False)
    figure.tight_layout()
    return figure


def write_summary(summary: ModelSummary, folder: Path, stem: str = "architecture") -> tuple[Path, Path]:
    """``<stem>.txt`` (the table) and ``<stem>.png`` (the diagram) in ``folder``."""
    from transferkit._io import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    table, image = folder / f"{stem}.txt", folder / f"{stem}.png"
    write_text(table, summary.table() + "\n")
    figure = plot_architecture(summary)
    atomic_write(image, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return table, image
