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
from typing import Any

from transferkit.errors import Interrupted
from transferkit.training.console import LIGHTNING_LOGGERS, StdoutHandler, summary_lines



class _Plain(logging.Formatter):
    """A warning as 'warning: MESSAGE', an error as 'error: MESSAGE', anything else as the message alone."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def quiet_libraries(verbose: bool) -> None:
    """The console: the epoch lines and the summary on stdout, warnings on stderr as 'warning: ...';
    ``--verbose`` adds every step, named by its logger, and Lightning's own lines."""
    level = logging.INFO if verbose else logging.WARNING
    existing = list(logging.getLogger().handlers)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # only the handler made here: one a host (a test, an application) set up stays as it is
        for handler in [h for h in logging.getLogger().handlers if h not in existing]:
            handler.setFormatter(_Plain())
            handler.setLevel(logging.WARNING)
    # DEBUG under --verbose: training.console then lets Lightning's own lines through.
    logging.getLogger("transferkit").setLevel(logging.DEBUG if verbose else logging.INFO)
    # The epoch lines are the run's console output, not diagnostics: bare, on stdout, like the summary.
    epochs = logging.getLogger("transferkit.epochs")
    epochs.propagate = False
    if not epochs.handlers:
        epochs.addHandler(StdoutHandler())
    for name in LIGHTNING_LOGGERS:
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
    print("\n".join(summary_lines(result, command_seconds)))


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


def print_predictions(result: Any, style: str, top_k: int) -> None:
    """``predict``'s answers on stdout as JSON, CSV (the columns of ``PredictionResult.to_pandas()``) or text."""
    import json

    scored = any(p.unknown_score is not None for p in result.predictions)
    if style == "json":
        print(json.dumps({
            "predictions": [
                {"path": p.path, "answer": p.answer, "unknown": p.unknown,
                 **({"unknown_score": round(p.unknown_score, 6)} if p.unknown_score is not None else {}),
                 "top_k": [{"label": l, "probability": round(q, 6)} for l, q in zip(p.labels, p.probabilities)]}
                for p in result.predictions
            ],
            "skipped": [{"path": path, "reason": reason} for path, reason in result.skipped],
        }, indent=2))
    elif style == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        k = len(result.predictions[0].labels) if result.predictions else top_k
        scores = ["unknown_score", "unknown"] if scored else []  # the columns of PredictionResult.to_pandas()
        writer.writerow(["path", "answer", *scores,
                         *(f"{column}_{rank}" for rank in range(1, k + 1) for column in ("label", "probability"))])
        for p in result.predictions:
            score = ([f"{p.unknown_score:.6f}", "true" if p.unknown else "false"] if p.unknown_score is not None
                     else [""] * len(scores))
            writer.writerow([p.path, p.answer, *score, *(v for l, q in zip(p.labels, p.probabilities) for v in (l, f"{q:.6f}"))])
    else:
        width = max([len(p.path) for p in result.predictions] + [5])
        for p in result.predictions:
            ranked = "  ".join(f"{l} {q:.3f}" for l, q in zip(p.labels, p.probabilities))
            answer = f"unknown (score {p.unknown_score:.3f})  " if p.unknown else ""
            print(f"{p.path:<{width}}  {answer}{ranked}")
