"""What a train shows a person, from Python as on the command line: the epoch lines and the
summary where nobody set up logging, and nothing of Lightning's that the user did not ask for."""

from __future__ import annotations

import contextlib
import shlex
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from transferkit.reporting.sentences import threshold_note
from transferkit.run.folder import RunFolder

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
LIGHTNING_MODULES = r"(lightning|lightning_fabric|pytorch_lightning)(\.|$)"


class StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` (or ``sys.<name>``) is when a line is logged, not the
    stream of the first call: a notebook or a test may replace it between trains."""

    def __init__(self, name: str = "stdout"):
        self.name_of_stream = name
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's notices (accelerators, tips, precision, why a fit stopped) and warnings kept
    off the console for the block, unless transferkit's logger is at DEBUG (``--verbose``)."""
    if logging.getLogger("transferkit").isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(max(logger.level, logging.WARNING))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=LIGHTNING_MODULES)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def console(progress: bool) -> Iterator[Callable[[Any], None]]:
    """The block of a train or resume: Lightning quiet and, where ``progress`` and the root logger
    has no handler (nobody set up logging: a script, a notebook), the epoch lines on stdout,
    transferkit's warnings on stderr and, through the function yielded, the summary."""
    started = time.perf_counter()
    epochs, package = logging.getLogger("transferkit.epochs"), logging.getLogger("transferkit")
    attach = progress and not logging.getLogger().handlers and not epochs.handlers and not package.handlers
    saved = (epochs.level, epochs.propagate, package.level)
    added: list[tuple[logging.Logger, logging.Handler]] = []
    if attach:
        warning = StdoutHandler("stderr")
        warning.setLevel(logging.WARNING)
        warning.setFormatter(logging.Formatter("warning: %(message)s"))
        added = [(epochs, StdoutHandler()), (package, warning)]
        for logger, handler in added:
            logger.addHandler(handler)
        epochs.setLevel(logging.INFO)
        epochs.propagate = False
        if package.level == logging.NOTSET:
            package.setLevel(logging.INFO)

    def show(result: Any) -> None:
        if attach and result.metrics:
            print("\n".join(summary_lines(result, time.perf_counter() - started)))

    try:
        with quiet_lightning():
            yield show
    finally:
        for logger, handler in added:
            logger.removeHandler(handler)
        epochs.setLevel(saved[0])
        epochs.propagate = saved[1]
        package.setLevel(saved[2])


def summary_lines(result: Any, command_seconds: float) -> list[str]:
    """The end of a train's console: the data, the scores, the threshold, where it all went."""
    metrics = result.run_metrics
    folder = RunFolder(result.run_dir)
    lines = [f"\nclasses ({len(result.classes)}): {', '.join(result.classes)}"]
    for split, counts in result.counts.items():
        lines.append(f"  {split:<5} {sum(counts.values()):>6} images  " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    train_counts = result.counts["train"]
    largest, smallest = max(train_counts, key=train_counts.get), min(train_counts, key=train_counts.get)
    ratio = train_counts[largest] / max(1, train_counts[smallest])
    if ratio >= 1.5:
        balanced = folder.read_config().class_balance != "none"
        hint = "" if balanced else "; --class-balance weight or sample evens it out"
        lines.append(f"class imbalance: {largest} has {ratio:.1f}x the training images of {smallest}{hint}")
    duplicates = result.duplicates
    if duplicates.get("groups"):
        lines.append(f"{duplicates['groups']} groups of identical images ({duplicates['across_splits']} across "
                     f"splits, {duplicates['across_classes']} under two classes; see {folder.duplicates_file})")
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} unreadable, non-image or duplicate files "
                     f"(see {folder.skipped_file})")
    if result.audit:
        lines.append(result.audit)
    best = metrics.phases[metrics.best_phase]
    where = f"{metrics.best_phase} phase, epoch {best.best_epoch}"
    saved = f"{metrics.val['accuracy']:.4f}"
    # The best epoch's score, read in training on the validation images without copies in train: a
    # line of its own only where it differs from the saved model's on them all.
    same = f"{best.best_val_acc:.4f}" == saved
    if not same:
        lines.append(f"best validation accuracy: {best.best_val_acc:.4f} ({where}){inflated_mark(metrics, 'val')}")
    lines.append(f"validation accuracy of the saved model: {saved}  macro F1: {metrics.val['macro_f1']:.4f}"
                 f"{f'  ({where})' if same else ''}{inflated_mark(metrics, 'val')}")
    if metrics.test is not None:
        lines.append(f"test accuracy: {metrics.test['accuracy']:.4f}  macro F1: {metrics.test['macro_f1']:.4f}"
                     f"{inflated_mark(metrics, 'test')}")
    calibration, unknown = metrics.trust.get("calibration"), metrics.trust.get("unknown")
    if calibration:
        lines.append(f"calibrated: temperature {calibration['temperature']:.3f}, validation ECE "
                     f"{calibration['ece_before']:.4f} before, {calibration['ece_after']:.4f} after "
                     f"({calibration['images']} validation images)")
    if unknown:
        note, too_few = threshold_note(unknown)
        lines.append(f'answers "none of these" above a {unknown["method"]} score of {unknown["threshold"]:.4g}, '
                     f'keeping {unknown["kept"]:.1%} of the {unknown["images"]} validation images it rests on')
        if too_few:
            lines.append(f"warning: {note}")
    # train_seconds runs from reading the data to the saved model: the imports come before it,
    # the audit and the report after.
    lines.append(f"wall time: {command_seconds:.1f} s (from reading the data to the saved model: "
                 f"{metrics.train_seconds:.1f} s)")
    if folder.report_file.is_file():
        lines.append(f"report: {folder.report_file}")
    audit = folder.audit_dir / "audit.html"
    lines.append(f"run folder: {result.run_dir}" + (f" (audit: {audit.relative_to(folder.root)})" if audit.is_file() else ""))
    run = shlex.quote(str(result.run_dir))
    lines.append(f"next: transferkit predict {run} IMAGES  |  transferkit export {run}  |  transferkit serve {run}")
    return lines


def inflated_mark(metrics: Any, split: str) -> str:
    """' (inflated: N near-copy pairs with train)' after a split's score that near-copies lift, else ''."""
    pairs = metrics.inflated(split)
    return f"  (inflated: {pairs:,} near-copy pairs with train, in leaks.csv)" if pairs else ""
