"""``transferkit compare``: train one dataset several ways and set the runs side by side."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from transferkit._io import read_json, write_csv_rows, write_json
from transferkit.commands.strategies import STRATEGIES, STRATEGY_FUNCTIONS, StrategySettings
from transferkit.config import (
    FEW_BLOCKS,
    MANY_BLOCKS,
    TrainConfig,
    parse_unfreeze,
    unfreeze_is_auto,
)
from transferkit.errors import ConfigError, RunFolderError, close_matches, raise_together
from transferkit.reporting.comparison import recommendation, write_comparison_figures, write_comparison_page
from transferkit.run.comparison import Comparison
from transferkit.run.folder import RunFolder
from transferkit.training.presets import AUTO, DEFAULT_PRESET

log = logging.getLogger(__name__)


COLUMNS = [
    "strategy", "model", "best_val_accuracy", "saved_val_accuracy", "test_accuracy", "macro_f1", "epochs_to_best", "epochs",
    "wall_seconds", "features_from_cache", "trainable_parameters", "total_parameters", "run",
]


def _uncacheable(models: list[str], unfreeze: str) -> list[str]:
    """The fine-tune strategy's models whose top cannot train on cached activations."""
    import timm

    from transferkit.models.split import boundary_index

    # Before the data is read, auto may yet mean either count: refused here only where neither
    # can be cached; where one can, the run itself says so if its count cannot.
    counts = [FEW_BLOCKS, MANY_BLOCKS] if unfreeze_is_auto(unfreeze) else [parse_unfreeze(unfreeze)]
    found = []
    for name in models:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=2)
        except Exception:  # noqa: BLE001 - an unknown name is reported by the run itself, with suggestions
            continue
        if all(boundary_index(model, count) is None for count in counts):
            blocks = f"{FEW_BLOCKS} or {MANY_BLOCKS}" if len(counts) > 1 else unfreeze
            found.append(f"--finetune-on activations: {name} cannot train its top {blocks} blocks on cached "
                         "activations (fine-tune strategy); use --finetune-on auto, which falls back to images")
    return found


def run_name(strategy: str, model: str, several_models: bool) -> str:
    return f"{strategy}-{model.replace('/', '_')}" if several_models else strategy


def _compared(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that must match to resume: whether progress bars show changes no result, so a
    resume with its output piped (``| tee``, nohup) is the same comparison."""
    return {**settings, "options": {k: v for k, v in settings.get("options", {}).items() if k != "progress"}}


def _check_settings(output: Path, settings: dict[str, Any]) -> None:
    """A comparison folder is resumed only with the settings it was started with."""
    path = output / "comparison.json"
    if path.is_file():
        earlier, now = (_compared(s) for s in (read_json(path), settings))
        if earlier != now:
            changed = sorted(key for key in set(earlier) | set(now) if earlier.get(key) != now.get(key))
            # Both values, since a default that changed between versions looks like "the same options".
            differences = "; ".join(f"{key} {earlier.get(key)!r} there, {now.get(key)!r} now" for key in changed)
            raise ConfigError([
                f"{output} holds a comparison with other settings ({differences}); "
                "rerun it with the same options or choose another --output"
            ])
    write_json(path, settings)


def compare(
    source: str,
    strategies: list[str] | tuple[str, ...] = tuple(STRATEGIES),
    models: list[str] | tuple[str, ...] | None = None,
    epochs: int = 5,
    output: str | os.PathLike[str] | None = None,
    patience: int = 3,
    hidden_size: int = 1024,
    unfreeze: str = "auto",
    options: dict[str, Any] | None = None,
) -> Comparison:
    """Train ``source`` with every strategy and model; write the table, figures and HTML page.

    ``options`` are flat train options applied to every run (``{"data.max_per_class": 300,
    "data.image_size": 224, ...}``, as ``TrainConfig.from_options`` takes them); each strategy
    then sets its own phases. ``{"preset": "best"}`` gives every run that preset's options but the
    phases, and its model where ``models`` (default: the options' model, else ``DEFAULT_MODEL``) is
    not given; a ``time_limit`` there is each run's own. Rerunning with the same arguments resumes:
    finished runs are kept, an interrupted one continues.
    """
    options = dict(options or {})
    if options.get("time_limit"):  # every strategy under one preset: the limit only stops phases
        options.setdefault("preset", DEFAULT_PRESET)
    if not models:
        models = [TrainConfig.from_options({k: v for k, v in options.items() if k in ("preset", "model.name")}
                                           if options.get("preset") != AUTO else {}).model.name]
    shared = _checked_config(strategies, models, epochs, unfreeze, options)
    output = (Path(output) if output else Path("runs") / f"compare-{Path(source).name or 'data'}").absolute()
    output.mkdir(parents=True, exist_ok=True)
    _check_settings(output, {
        "source": source, "strategies": list(strategies), "models": list(models), "epochs": epochs,
        "patience": patience, "hidden_size": hidden_size, "unfreeze": unfreeze, "options": options,
    })
    settings = StrategySettings(epochs, patience, hidden_size, unfreeze)
    run_dirs = [(strategy, model, output / run_name(strategy, model, len(models) > 1))
                for model in models for strategy in strategies]
    first_run: Path | None = None
    for strategy, model, run_dir in sorted(run_dirs, key=lambda run: run[0] == "scratch"):
        _train_one(source, strategy, model, run_dir, STRATEGY_FUNCTIONS[strategy](shared, settings), first_run)
        first_run = first_run or run_dir

    rows = [_row(strategy, model, run_dir) for strategy, model, run_dir in run_dirs]
    comparison = Comparison(output=output, rows=rows)
    write_csv_rows(output / "comparison.csv", COLUMNS, rows)
    recommended = recommendation(comparison)
    write_comparison_page(comparison, write_comparison_figures(comparison), STRATEGIES, recommended)
    log.info("%s", recommended)
    return comparison


def _checked_config(
    strategies: list[str] | tuple[str, ...], models: list[str] | tuple[str, ...], epochs: int, unfreeze: str,
    options: dict[str, Any],
) -> TrainConfig:
    """The config every run shares, once the comparison's own arguments are acceptable."""
    problems = [f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}{close_matches(s, STRATEGIES)}"
                for s in strategies if s not in STRATEGIES]
    if not strategies:
        problems.append("--strategies is empty; choose from " + ", ".join(STRATEGIES))
    if not models:
        problems.append("--models is empty; give at least one timm model name")
    if epochs < 1:
        problems.append(f"--epochs must be at least 1, got {epochs}")
    if len(set(strategies)) != len(strategies) or len(set(models)) != len(models):
        problems.append("--strategies and --models must not repeat a name")
    try:
        parse_unfreeze(unfreeze)
    except ValueError:  # else only the fine-tune strategy's run would say so, after the others trained
        problems.append(f"--unfreeze must be a block count (3), a fraction (0.3), 'all' or 'auto', got {unfreeze!r}")
    if options.get("preset") == AUTO:
        problems.append("--preset auto chooses per run, and compare trains every strategy alike; give --preset "
                        "fast, balanced or best (--time-limit then stops each run's phases at it)")
    shared = raise_together(problems, lambda: TrainConfig.from_options(options))
    if shared.finetune_on == "activations" and "fine-tune" in strategies:
        raise_together(_uncacheable(list(models), unfreeze), lambda: None)  # before any run trains, not at the fourth
    return shared


def _train_one(source: str, strategy: str, model: str, run_dir: Path, config: TrainConfig, first_run: Path | None) -> None:
    """Train, resume or keep one run. The first run sets the split and audits the images; a
    scratch run never goes first, as its random features would audit and group nothing real."""
    from transferkit.commands.train import resume, train

    folder = RunFolder(run_dir)
    with epoch_lines_of(strategy):
        if folder.is_finished():
            log.info("%s: finished earlier, kept", run_dir.name)
        elif folder.is_run():
            log.info("%s: interrupted earlier, resuming", run_dir.name)
            resume(run_dir)
        else:
            config = replace(config, model=replace(config.model, name=model), output=str(run_dir))
            if first_run is not None:  # same images and splits: the first run's audit covers them all
                config = replace(config, data=replace(config.data, splits_from=str(first_run)), audit=False)
            elif strategy == "scratch":  # only scratch was asked for: no pretrained features to audit with
                config = replace(config, audit=False)
            log.info("%s: training (%s)", run_dir.name, STRATEGIES[strategy])
            train(source, config, progress=False)  # the comparison prints its own table


EVERY_LAYER = frozenset({"scratch", "full"})
"""Strategies whose one phase trains every layer: their epochs are not fine-tuning a pretrained top."""


class _StrategyPrefix(logging.Filter):
    """Each epoch line starts with the strategy it belongs to; a phase that trains every layer says so."""

    def __init__(self, strategy: str):
        super().__init__()
        self.strategy = strategy

    def filter(self, record: logging.LogRecord) -> bool:
        line = record.getMessage()
        if self.strategy in EVERY_LAYER and line.startswith("finetune"):
            line = "all     " + line[len("finetune"):]
        record.msg, record.args = f"{self.strategy:<12} {line}", None
        return True


@contextlib.contextmanager
def epoch_lines_of(strategy: str) -> Iterator[None]:
    """While ``strategy`` trains, its epoch lines (the ``transferkit.epochs`` log) name it."""
    epochs = logging.getLogger("transferkit.epochs")
    prefix = _StrategyPrefix(strategy)
    epochs.addFilter(prefix)
    try:
        yield
    finally:
        epochs.removeFilter(prefix)


def _row(strategy: str, model: str, run_dir: Path) -> dict[str, Any]:
    metrics = RunFolder(run_dir).read_metrics()
    if metrics is None:
        raise RunFolderError(f"{run_dir} has not finished; rerun the comparison to finish it")
    phases = metrics.phases
    order = [name for name in ("frozen", "finetune") if name in phases]
    # Epochs of the phases before the best one count: fine-tuning starts after the head's epochs.
    epochs_before = sum(phases[name].epochs for name in order[: order.index(metrics.best_phase)])
    return {
        "strategy": strategy,
        "model": model,
        # The curve's peak; the saved model is the lowest validation loss's epoch, whose accuracy can be lower.
        "best_val_accuracy": max((h.val_acc for h in RunFolder(run_dir).read_history() if h.val_acc is not None),
                                 default=None),
        "saved_val_accuracy": phases[metrics.best_phase].best_val_acc,
        "test_accuracy": metrics.test["accuracy"] if metrics.test is not None else None,
        "macro_f1": metrics.judged["macro_f1"],
        "epochs_to_best": epochs_before + phases[metrics.best_phase].best_epoch,
        "epochs": sum(phases[name].epochs for name in order),
        "wall_seconds": float(metrics.train_seconds),
        # Runs after the first that freeze the same backbone read its features instead of computing them.
        "features_from_cache": metrics.features["from_cache"] if metrics.features is not None else None,
        "trainable_parameters": max(phases[name].trainable_parameters for name in order),
        "total_parameters": phases[order[0]].total_parameters,
        "run": run_dir.name,
    }
