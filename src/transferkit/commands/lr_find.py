"""``lr-find``: the learning-rate sweep that ``--frozen-lr auto`` or ``--finetune-lr auto`` would run
in a train with the same options, on its own: the suggested rate, the loss against the rate
(plot and CSV), and no run folder."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.commands.prepare import fit_inputs, prepare_fit
from transferkit.commands.train import resolve_run_dir
from transferkit.config import TrainConfig
from transferkit.data.registry import source_problems
from transferkit.errors import ConfigError
from transferkit.run.folder import RunFolder
from transferkit.training.console import console
from transferkit.training.lr_find import write_sweep_plot, write_sweep_table
from transferkit.training.progress import PhaseProgress
from transferkit.training.recipe import head_phase, run_phase, suggested_rate, sweep_phase
from transferkit.training.trainer_options import trainer_options

PHASES = ("frozen", "finetune")


@dataclass
class LrFindResult:
    """A sweep's suggestion and its curve; ``plot`` and ``table`` hold them on disk."""

    phase: str
    suggestion: float
    """The rate where the smoothed loss falls fastest per decade, else the phase's default rate."""
    found: bool
    """False where the sweep found no falling loss and ``suggestion`` is the default."""
    rates: list[float]
    losses: list[float]
    """The smoothed training loss after each rate's step."""
    output: Path
    plot: Path
    table: Path

    def line(self) -> str:
        """The suggestion in one line, as the command prints it."""
        how = (f"the steepest fall of the smoothed loss over {len(self.rates)} rates from {self.rates[0]:.0e} to "
               f"{self.rates[-1]:.1e}") if self.found else "the default: the sweep found no falling loss"
        return f"suggested --{self.phase}-lr {self.suggestion:.2e} ({how}; plot: {self.plot}, table: {self.table})"

    def __repr__(self) -> str:
        return f"LrFindResult({self.phase!r}, suggestion={self.suggestion:.2e}, output={str(self.output)!r})"


def lr_find(
    data: str | os.PathLike[str], config: TrainConfig | None = None, *, phase: str = "frozen",
    model: str | None = None, output: str | os.PathLike[str] | None = None, seed: int | None = None,
    options: dict[str, Any] | None = None, progress: bool = True,
) -> LrFindResult:
    """Sweep phase ``phase``'s learning rate as ``train`` with the same ``config`` would before
    training it, and write ``lr-find-<phase>.png`` and ``.csv`` into ``output`` (else
    ``runs/lr-find-<data>-<model>-<time>``): ``transferkit.lr_find("photos/").suggestion``.

    ``frozen`` sweeps the new head on the backbone's cached features; ``finetune`` first trains
    the head as ``train`` does (``config.frozen``), then sweeps fine-tuning of the top blocks.
    ``config``, ``model``, ``seed`` and ``options`` are ``train``'s; ``progress`` shows the head's
    epoch lines where logging is not set up.
    """
    problems = source_problems(data)
    if phase not in PHASES:
        problems.append(f"--phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if problems:
        raise ConfigError(problems)
    overrides = {key: value for key, value in (("model.name", model), ("seed", seed)) if value is not None}
    config = (config or TrainConfig()).with_options({**overrides, **(options or {})})
    if getattr(config, phase).epochs == 0:
        raise ConfigError([f"--phase {phase}: --{phase}-epochs is 0, so train would not run that phase; "
                           "give it epochs or sweep the other phase"])
    source = os.fspath(data)
    with console(progress), tempfile.TemporaryDirectory(prefix="transferkit-lr-find-") as scratch:
        finder, rate = _sweep(source, dataclasses.replace(config, output=scratch), phase)
    folder = Path(output).absolute() if output else _default_output(source, config)
    plot, table = folder / f"lr-find-{phase}.png", folder / f"lr-find-{phase}.csv"
    write_sweep_plot(finder, phase, rate, plot)
    write_sweep_table(finder, table)
    rates, losses = list(finder.results["lr"]), list(finder.results["loss"])
    index = getattr(finder, "_optimal_idx", None)  # where suggestion() found the rate; None: it fell back
    return LrFindResult(phase, rate, index is not None and rates[index] == rate, rates, losses, folder, plot, table)


def _sweep(source: str, config: TrainConfig, phase: str) -> tuple[Any, float]:
    """Train's preparation in a scratch run folder (``config.output``), the head trained there
    first for ``finetune``, then the sweep and its suggestion."""
    started = time.perf_counter()
    lightning_options = trainer_options(config.accelerator, config.devices, config.num_nodes, config.strategy,
                                        config.precision)
    folder = RunFolder(config.output)  # type: ignore[arg-type]
    prepared = prepare_fit(source, config, folder, False, lightning_options, started, say_estimate=False)
    folder.write_config(source, prepared.config)  # an auto head rate is written back into it, as in a train
    model, plan = prepared.model, prepared.plan
    progress = PhaseProgress(folder, write=True, create_pretrained=prepared.create_model, model=model)
    inputs = fit_inputs(prepared, progress)
    if phase == "finetune" and plan.frozen.epochs > 0:
        run_phase("frozen", head_phase, model, plan, inputs, progress)  # fine-tuning starts from the trained head
    finder = sweep_phase(phase, model, plan, inputs, folder.writable(folder.checkpoints_dir))
    return finder, suggested_rate(finder, phase)


def _default_output(source: str, config: TrainConfig) -> Path:
    """``runs/lr-find-<data>-<model>-<time>``, named as train names its run folders."""
    run_dir = resolve_run_dir(source, dataclasses.replace(config, output=None))
    return run_dir.with_name(f"lr-find-{run_dir.name}")
