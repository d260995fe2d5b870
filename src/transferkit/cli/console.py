"""What the command line does to its process and prints: logging on the console, odd file names,
SIGTERM as a stop, exit statuses, and the summaries of train and evaluate."""

from __future__ import annotations

import codecs
import io
import logging
import os
import signal
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any

from transferkit.errors import Interrupted
from transferkit.run.folder import RunFolder

if TYPE_CHECKING:
    from transferkit.run.records import RunMetrics


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is when a line is logged, not the stream of the first
    call: ``main`` may run many times in one process (tests, notebooks) with stdout replaced."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def quiet_libraries(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transferkit").setLevel(logging.INFO)
    # The epoch lines are the run's console output, not diagnostics: bare, on stdout, like the summary.
    epochs = logging.getLogger("transferkit.epochs")
    epochs.propagate = False
    if not epochs.handlers:
        epochs.addHandler(_StdoutHandler())
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TQDM_MININTERVAL", "0.5")


def tolerate_odd_file_names() -> None:
    """A file name that is not valid UTF-8 reaches Python as lone surrogates; on a UTF-8 stream
    they are written back as the original bytes (the name ``ls`` shows), elsewhere escaped,
    instead of an encoding error after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            utf8 = codecs.lookup(stream.encoding).name == "utf-8"
            stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")


def os_error(error: OSError) -> str:
    """'could not write FILE: No space left on device' rather than a traceback."""
    where = f" {error.filename}" if error.filename else ""
    return f"could not read or write{where}: {error.strerror or error}"


stopped_by: int | None = None
"""The signal that asked this process to stop, once one has."""


def stop_on_sigterm() -> None:
    """SIGTERM (kill, docker stop, a scheduler's time limit) stops a command the way Ctrl-C does:
    it unwinds, so temporary files are removed and the user is told how to continue."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: Any) -> None:
        global stopped_by
        stopped_by = signum
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, stop)


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal, as a shell reports a process a signal ended: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT)


def print_train_summary(result: Any, command_seconds: float) -> None:
    metrics = result.run_metrics
    print(f"\nclasses ({len(result.classes)}): {', '.join(result.classes)}")
    for split, counts in result.counts.items():
        print(f"  {split:<5} {sum(counts.values()):>6} images  " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    train_counts = result.counts["train"]
    largest, smallest = max(train_counts, key=train_counts.get), min(train_counts, key=train_counts.get)
    ratio = train_counts[largest] / max(1, train_counts[smallest])
    if ratio >= 1.5:
        balanced = RunFolder(result.run_dir).read_config().class_balance != "none"
        hint = "" if balanced else "; --class-balance weight or sample evens it out"
        print(f"class imbalance: {largest} has {ratio:.1f}x the training images of {smallest}{hint}")
    folder = RunFolder(result.run_dir)
    duplicates = result.duplicates
    if duplicates.get("groups"):
        print(f"{duplicates['groups']} groups of identical images ({duplicates['across_splits']} across splits, "
              f"{duplicates['across_classes']} under two classes; see {folder.duplicates_file})")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable, non-image or duplicate files "
              f"(see {folder.skipped_file})")
    if result.audit:
        print(f"{result.audit} (see {folder.audit_dir / 'audit.html'})")
    best = metrics.phases[metrics.best_phase]
    print(f"best validation accuracy: {best.best_val_acc:.4f} ({metrics.best_phase} phase, epoch {best.best_epoch})"
          f"{inflated_mark(metrics, 'val')}")
    print(f"validation accuracy of the saved model: {metrics.val['accuracy']:.4f}  macro F1: {metrics.val['macro_f1']:.4f}"
          f"{inflated_mark(metrics, 'val')}")
    if metrics.test is not None:
        print(f"test accuracy: {metrics.test['accuracy']:.4f}  macro F1: {metrics.test['macro_f1']:.4f}"
              f"{inflated_mark(metrics, 'test')}")
    calibration, unknown = metrics.trust.get("calibration"), metrics.trust.get("unknown")
    if calibration:
        print(f"calibrated: temperature {calibration['temperature']:.3f}, validation ECE "
              f"{calibration['ece_before']:.4f} before, {calibration['ece_after']:.4f} after "
              f"({calibration['images']} validation images)")
    if unknown:
        print(f"answers unknown above a {unknown['method']} score of {unknown['threshold']:.4g} "
              f"(keeps {unknown['kept']:.1%} of validation images)")
    # train_seconds runs from reading the data to the saved model: the imports come before it,
    # the audit and the report after.
    print(f"wall time: {command_seconds:.1f} s (from reading the data to the saved model: "
          f"{metrics.train_seconds:.1f} s)")
    print(f"run folder: {result.run_dir}")


def inflated_mark(metrics: RunMetrics, split: str) -> str:
    """' (inflated: N near-copy pairs with train)' after a split's score that near-copies lift, else ''."""
    pairs = metrics.inflated(split)
    return f"  (inflated: {pairs:,} near-copy pairs with train, in leaks.csv)" if pairs else ""


def print_metrics(metrics: dict[str, Any], title: str) -> None:
    print(title)
    rows = [("accuracy", metrics["accuracy"]), ("balanced accuracy", metrics["balanced_accuracy"])]
    rows += [(f"top-{k} accuracy", v) for k, v in metrics["top_k_accuracy"].items()]
    rows += [("macro F1", metrics["macro_f1"]), ("weighted F1", metrics["weighted_f1"]),
             ("log loss", metrics["log_loss"]), ("calibration error (ECE)", metrics["expected_calibration_error"])]
    for name, value in rows:
        print(f"  {name:<24} {value:.4f}")
    calibration = metrics.get("calibration")
    if calibration:
        print(f"  {'ECE before calibration':<24} {calibration['uncalibrated_expected_calibration_error']:.4f}"
              f"  (temperature {calibration['temperature']:.3f}, fitted on {calibration['fitted_on']})")
    unknown = metrics.get("unknown")
    if unknown:
        print(f"  {'answered unknown':<24} {unknown['unknown']} of {unknown['images']} images "
              f"({1 - unknown['kept']:.1%}; {unknown['method']} score above {unknown['threshold']:.4g})")
    width = max(12, *(len(r["class"]) for r in metrics["per_class"]))
    print(f"\n  {'class':<{width}} {'precision':>9} {'recall':>9} {'F1':>9} {'support':>8}")

    def cell(value: float | None) -> str:
        return f"{value:>9.4f}" if value is not None else f"{'-':>9}"

    for row in metrics["per_class"]:
        print(f"  {row['class']:<{width}} {cell(row['precision'])} {cell(row['recall'])} {cell(row['f1'])} {row['support']:>8}")
    if metrics["most_confused"]:
        top = metrics["most_confused"][0]
        print(f"\n  most confused: {top['label']} predicted as {top['predicted']} ({top['count']} images)")


def print_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
