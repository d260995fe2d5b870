"""The command line: one command per public function, options generated from the config
dataclasses so ``--help`` and the Python API never drift apart."""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import difflib
import io
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from transferkit.config import (
    DATA_HELP,
    DEFAULT_MODEL,
    DataConfig,
    ModelConfig,
    PhaseConfig,
    TrainConfig,
    source_problems,
)
from transferkit.errors import ConfigError, Interrupted, TransferkitError, raise_together
from transferkit.runs import RunFolder

# (dataclass, flag prefix, TrainConfig attribute)
SECTIONS: list[tuple[type, str, str]] = [
    (DataConfig, "", "data"),
    (ModelConfig, "", "model"),
    (PhaseConfig, "frozen-", "frozen"),
    (PhaseConfig, "finetune-", "finetune"),
]
TOP_LEVEL_SKIP = {"data", "model", "frozen", "finetune"}


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}{name.replace('_', '-')}"


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.8,0.16,0.04, got {text!r}") from None


def _converter(kind: Any) -> Any:
    text = str(kind)
    if "tuple" in text:
        return _fractions
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def _add_fields(
    parser: argparse.ArgumentParser, kind: type, prefix: str, dest_prefix: str, defaults: Any,
    skip: frozenset[str] = frozenset(),
) -> None:
    group = parser.add_argument_group(dest_prefix or "run")
    for spec in dataclasses.fields(kind):
        if (spec.name in TOP_LEVEL_SKIP and kind is TrainConfig) or spec.name in skip:
            continue
        default = getattr(defaults, spec.name)
        help_text = spec.metadata.get("help", "")
        dest = f"{dest_prefix}.{spec.name}" if dest_prefix else spec.name
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if "bool" in str(spec.type):
            group.add_argument(
                spec.metadata.get("flag") or _flag(prefix, spec.name),
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {'on' if default else 'off'})",
            )
            continue
        group.add_argument(
            spec.metadata.get("flag") or _flag(prefix, spec.name),
            dest=dest,
            type=_converter(spec.type),
            metavar=spec.name.upper(),
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {shown})",
        )


def _train_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a classifier on an image folder or a registered dataset",
        description="Two phases: a new head on frozen backbone features, then fine-tuning the top blocks.",
    )
    # DATA is optional here only because --resume takes the run's own; without it, it is required.
    parser.add_argument("source", nargs="?", default=None, help=DATA_HELP, metavar="DATA")
    defaults = TrainConfig()
    for kind, prefix, attribute in SECTIONS:
        _add_fields(parser, kind, prefix, attribute, getattr(defaults, attribute))
    _add_fields(parser, TrainConfig, "", "", defaults)
    parser.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run from its folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return parser


def _train_config(source: str | None, options: dict[str, Any]) -> TrainConfig:
    """The config the flags describe; a missing DATA is reported with every other problem."""
    return raise_together(source_problems(source), lambda: TrainConfig.from_options(options))


def _print_train_summary(result: Any) -> None:
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
    best = metrics.phases[metrics.best_phase]
    print(f"best validation accuracy: {best.best_val_acc:.4f} ({metrics.best_phase} phase, epoch {best.best_epoch})")
    print(f"validation accuracy of the saved model: {metrics.val['accuracy']:.4f}  macro F1: {metrics.val['macro_f1']:.4f}")
    if metrics.test is not None:
        print(f"test accuracy: {metrics.test['accuracy']:.4f}  macro F1: {metrics.test['macro_f1']:.4f}")
    print(f"wall time: {metrics.train_seconds:.1f} s")
    print(f"run folder: {result.run_dir}")


def _exit_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal, as a shell reports a process a signal ended: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT)


def _how_to_finish(output: str | None) -> str:
    if output and RunFolder(output).is_run():
        return f"finish the run with: transferkit train --resume {output}"
    return "nothing was trained yet; run the same command again"


def _run_train(args: argparse.Namespace) -> int:
    from transferkit.training.recipe import resolve_run_dir, resume, train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "source", "resume", "verbose")}
    # Progress bars only for a person watching: piped to a file, the epoch lines are the whole log.
    options.setdefault("progress", sys.stderr.isatty())
    config = None if args.resume else _train_config(args.source, options)
    if config is not None:  # named here, so that a stopped run can say where it is
        config = dataclasses.replace(config, output=str(resolve_run_dir(args.source, config)))
    output = args.resume if config is None else config.output
    try:
        result = resume(args.resume) if config is None else train(args.source, config)
    except KeyboardInterrupt as interrupt:
        print(f"\ninterrupted; {_how_to_finish(output)}", file=sys.stderr)
        return _exit_status(interrupt)
    except OSError as error:  # a full disk or a folder that became unwritable, mid-run
        print(f"error: {_os_error(error)}; {_how_to_finish(output)}", file=sys.stderr)
        return 1
    if result.metrics:  # empty on the other processes of a multi-process run
        _print_train_summary(result)
    return 0


def _compare_parser(subparsers: Any) -> None:
    from transferkit.compare import STRATEGIES

    parser = subparsers.add_parser(
        "compare", help="train one dataset with several strategies (and backbones) and compare them",
        description="Strategies: " + "; ".join(f"{name}: {text}" for name, text in STRATEGIES.items())
        + ". Every run gets the same split, seed, epoch budget and early stopping. Rerun to resume.",
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated strategies (default: {','.join(STRATEGIES)})")
    parser.add_argument("--models", default=DEFAULT_MODEL, help=f"comma-separated timm model names (default: {DEFAULT_MODEL})")
    parser.add_argument("--epochs", type=int, default=5, help="epochs for every phase of every run (default: 5)")
    parser.add_argument("--patience", type=int, default=3,
                        help="every phase stops after this many epochs without a lower validation loss (default: 3)")
    parser.add_argument("--unfreeze", default="3", help="blocks the fine-tune strategy unfreezes (default: 3)")
    parser.add_argument("--output", metavar="DIR", help="comparison folder (default: runs/compare-<data>)")
    parser.add_argument("source", nargs="?", default=None, help=DATA_HELP, metavar="DATA")
    defaults = TrainConfig()
    _add_fields(parser, DataConfig, "", "data", defaults.data, skip=frozenset({"splits_from"}))
    _add_fields(parser, ModelConfig, "", "model", defaults.model, skip=frozenset({"name", "hidden_size"}))
    parser.add_argument("--hidden-size", type=int, default=1024, help="hidden layer width of frozen-dense (default: 1024)")
    _add_fields(parser, TrainConfig, "", "", defaults, skip=frozenset({"output", "batchnorm"}))
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")


def _run_compare(args: argparse.Namespace) -> int:
    from transferkit.compare import compare

    own = {"command", "verbose", "strategies", "models", "epochs", "patience", "unfreeze", "output", "hidden_size"}
    options = {k: v for k, v in vars(args).items() if k not in own and k != "source"}
    options.setdefault("progress", sys.stderr.isatty())
    problems = source_problems(args.source)
    if problems:
        raise ConfigError(problems)
    try:
        comparison = compare(
            args.source,
            strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
            models=[m.strip() for m in args.models.split(",") if m.strip()],
            epochs=args.epochs, output=args.output, patience=args.patience, hidden_size=args.hidden_size,
            unfreeze=args.unfreeze, options=options,
        )
    except KeyboardInterrupt as interrupt:
        print("\ninterrupted; rerun the same command to continue (finished runs are kept)", file=sys.stderr)
        return _exit_status(interrupt)
    print(comparison.table())
    skipped = comparison.skipped()
    if skipped:
        print(f"\nskipped {len(skipped)} unreadable, non-image or duplicate files (see {comparison.skipped_list})")
    print(f"\ncomparison written to {comparison.output} (comparison.csv, comparison.html)")
    return 0


def _evaluate_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="metrics of a trained run on one of its splits or on a labelled folder",
        description="Metrics of a run's model; writes metrics.json and predictions.csv.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder, or an exported .onnx file (which needs DATA)")
    parser.add_argument("data", metavar="DATA", nargs="?", help="labelled folder DATA/<class>/*; default: the run's own split")
    parser.add_argument("--split", choices=["train", "val", "test"], help="split to evaluate (default: test, else val)")
    parser.add_argument("--output", metavar="DIR", help="folder for metrics.json and predictions.csv (default: RUN/evaluation/<name>)")
    _add_inference_options(parser)


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tta", action="store_true", help="average each image with its mirror image")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar on inputs larger than one batch")


def _predict_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict", help="top-k labels for images or folders of images",
        description="Top-k labels with probabilities for every image; unreadable files are listed and skipped.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder, its model/ folder, or an exported .onnx file")
    parser.add_argument("inputs", metavar="IMAGE_OR_FOLDER", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=3, help="labels per image (default: 3)")
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format (default: table)")
    _add_inference_options(parser)


def _report_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report", help="the HTML report of one run, or of several side by side",
        description="Figures and one self-contained HTML file with the configuration, data, metrics and figures.",
    )
    parser.add_argument("runs", metavar="RUN", nargs="+", help="run folders")
    parser.add_argument("--output", metavar="FILE", help="HTML file (default: RUN/report.html for one run, ./report.html for several)")


def _export_parser(subparsers: Any) -> None:
    from transferkit.export import FORMATS, QUANTIZATIONS

    parser = subparsers.add_parser(
        "export", help="export a run's model to ONNX (float or int8) or TorchScript",
        description="Export a run's model and check the file against the eager model on the validation split.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="file format (default: onnx)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="dynamic int8 quantisation of the weights (ONNX only)")
    parser.add_argument("--output", metavar="FILE", help="file to write (default: RUN/export/model[.int8].onnx or model.torchscript.pt)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch in the check (default: 64)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")


def _serve_parser(subparsers: Any) -> None:
    from transferkit.serve import ServeLimits

    defaults = ServeLimits()
    parser = subparsers.add_parser(
        "serve", help="a web page and REST API for a run or an exported .onnx file",
        description="GET / (a page to drop an image on), POST /predict, GET /model, GET /health.",
    )
    parser.add_argument("model", metavar="RUN_OR_ONNX", help="run folder or exported .onnx file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help=f"labels per image (default: {defaults.top_k})")
    parser.add_argument("--max-file-mb", type=float, default=defaults.max_file_bytes / 2**20,
                        help=f"largest accepted file in MiB (default: {defaults.max_file_bytes / 2**20:g})")
    parser.add_argument("--max-files", type=int, default=defaults.max_files,
                        help=f"most files per request (default: {defaults.max_files})")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help=f"most pixels per image (default: {defaults.max_pixels:,})")
    parser.add_argument("--max-queued", type=int, default=defaults.max_queued,
                        help=f"most prediction requests admitted at once; more are answered 503 (default: {defaults.max_queued})")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help=f"most open connections; more are refused (default: {defaults.max_connections})")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout, metavar="SECONDS",
                        help=f"time a client has to send its request headers (default: {defaults.header_timeout:g})")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout, metavar="SECONDS",
                        help=f"time a client has to upload its files (default: {defaults.body_timeout:g})")
    parser.add_argument("--keep-alive-timeout", type=float, default=defaults.keep_alive_timeout, metavar="SECONDS",
                        help=f"time an idle connection stays open (default: {defaults.keep_alive_timeout:g})")


def _summary_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "summary", help="the model layer by layer: type, output shape, parameters, which phase trains it",
        description="Prints the table and writes it with an architecture diagram (architecture.txt, architecture.png).",
    )
    parser.add_argument("source", metavar="RUN_OR_MODEL_NAME", help="run folder, or any timm model name (trained with the default recipe)")
    parser.add_argument("--depth", type=int, help="levels of sub-modules to list (default: down to the blocks fine-tuning unfreezes)")
    parser.add_argument("--num-classes", type=int, default=1000, help="head size for a model name (default: 1000)")
    parser.add_argument("--output", metavar="DIR", help="folder for the files (default: the run folder, or . for a model name)")


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    print(title)
    rows = [("accuracy", metrics["accuracy"]), ("balanced accuracy", metrics["balanced_accuracy"])]
    rows += [(f"top-{k} accuracy", v) for k, v in metrics["top_k_accuracy"].items()]
    rows += [("macro F1", metrics["macro_f1"]), ("weighted F1", metrics["weighted_f1"]),
             ("log loss", metrics["log_loss"]), ("calibration error (ECE)", metrics["expected_calibration_error"])]
    for name, value in rows:
        print(f"  {name:<24} {value:.4f}")
    width = max(12, *(len(r["class"]) for r in metrics["per_class"]))
    print(f"\n  {'class':<{width}} {'precision':>9} {'recall':>9} {'F1':>9} {'support':>8}")

    def cell(value: float | None) -> str:
        return f"{value:>9.4f}" if value is not None else f"{'-':>9}"

    for row in metrics["per_class"]:
        print(f"  {row['class']:<{width}} {cell(row['precision'])} {cell(row['recall'])} {cell(row['f1'])} {row['support']:>8}")
    if metrics["most_confused"]:
        top = metrics["most_confused"][0]
        print(f"\n  most confused: {top['label']} predicted as {top['predicted']} ({top['count']} images)")


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)


def _run_evaluate(args: argparse.Namespace) -> int:
    from transferkit.evaluate import evaluate

    evaluation = evaluate(
        args.run, args.data, split=args.split, output=args.output, tta=args.tta,
        batch_size=args.batch_size, progress=args.progress,
    )
    _print_skipped(evaluation.skipped)
    _print_metrics(evaluation.metrics, f"{evaluation.name}: {evaluation.metrics['images']} images")
    print(f"\nwritten to {evaluation.output}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    import json

    from transferkit.evaluate import predict

    if args.top_k < 1:
        raise ConfigError([f"--top-k must be 1 or more, got {args.top_k}"])
    result = predict(args.run, args.inputs, top_k=args.top_k, batch_size=args.batch_size, tta=args.tta,
                     progress=args.progress)
    _print_skipped(result.skipped)
    if args.format == "json":
        print(json.dumps({
            "predictions": [
                {"path": p.path, "top_k": [{"label": l, "probability": round(q, 6)} for l, q in zip(p.labels, p.probabilities)]}
                for p in result.predictions
            ],
            "skipped": [{"path": path, "reason": reason} for path, reason in result.skipped],
        }, indent=2))
    elif args.format == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        k = len(result.predictions[0].labels) if result.predictions else args.top_k
        writer.writerow(["path", *(f"{column}_{rank}" for rank in range(1, k + 1) for column in ("label", "probability"))])
        for p in result.predictions:
            writer.writerow([p.path, *(v for l, q in zip(p.labels, p.probabilities) for v in (l, f"{q:.6f}"))])
    else:
        width = max([len(p.path) for p in result.predictions] + [5])
        for p in result.predictions:
            ranked = "  ".join(f"{l} {q:.3f}" for l, q in zip(p.labels, p.probabilities))
            print(f"{p.path:<{width}}  {ranked}")
    if not result.predictions:
        print("error: no readable images among the inputs", file=sys.stderr)
        return 2
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from transferkit.export import export

    result = export(args.run, format=args.format, quantize=args.quantize, output=args.output,
                    batch_size=args.batch_size, progress=args.progress)
    print(f"exported {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.format}{'-' + result.quantize if result.quantize else ''})")
    print(f"checked on {result.images} validation images against the eager float model:")
    print(f"  max |probability difference|  {result.max_abs_diff:.2e}")
    change = result.accuracy - result.reference_accuracy
    print(f"  accuracy  exported {result.accuracy:.4f}  eager {result.reference_accuracy:.4f}  change {change:+.4f}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from transferkit.serve import ServeLimits, serve

    # Checked before the model loads, every problem at once.
    problems = [] if 1 <= args.port <= 65535 else [f"--port must be between 1 and 65535, got {args.port}"]
    positive = ("top_k", "max_file_mb", "max_files", "max_pixels", "max_queued", "max_connections",
                "header_timeout", "body_timeout", "keep_alive_timeout")
    problems += [f"--{name.replace('_', '-')} must be above 0, got {getattr(args, name):g}"
                 for name in positive if not getattr(args, name) > 0]
    if problems:
        raise ConfigError(problems)
    limits = ServeLimits(top_k=args.top_k, max_file_bytes=int(args.max_file_mb * 2**20), max_files=args.max_files,
                         max_pixels=args.max_pixels, max_queued=args.max_queued, max_connections=args.max_connections,
                         header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                         keep_alive_timeout=args.keep_alive_timeout)
    print(f"serving {args.model} on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    serve(args.model, host=args.host, port=args.port, limits=limits)
    return 0


def _run_summary(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transferkit.summary import summarize, write_summary

    summary = summarize(args.source, depth=args.depth, num_classes=args.num_classes)
    is_run = RunFolder(args.source).has_model()
    folder = Path(args.output) if args.output else Path(args.source) if is_run else Path(".")
    stem = "architecture" if is_run else args.source.replace("/", "_").replace(":", "_") + "-architecture"
    print(summary.table())
    table, image = write_summary(summary, folder, stem)
    print(f"\nwritten to {table} and {image}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from transferkit.report import write_report

    path = write_report(args.runs, args.output)
    print(f"report written to {path}")
    return 0


COMMANDS = {
    "train": _run_train, "evaluate": _run_evaluate, "predict": _run_predict, "report": _run_report,
    "export": _run_export, "serve": _run_serve, "summary": _run_summary, "compare": _run_compare,
}


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is when a line is logged, not the stream of the first
    call: ``main`` may run many times in one process (tests, notebooks) with stdout replaced."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _quiet_libraries(verbose: bool) -> None:
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


def _tolerate_odd_file_names() -> None:
    """A file name that is not valid UTF-8 reaches Python as lone surrogates; on a UTF-8 stream
    they are written back as the original bytes (the name ``ls`` shows), elsewhere escaped,
    instead of an encoding error after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            utf8 = codecs.lookup(stream.encoding).name == "utf-8"
            stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")


def _os_error(error: OSError) -> str:
    """'could not write FILE: No space left on device' rather than a traceback."""
    where = f" {error.filename}" if error.filename else ""
    return f"could not read or write{where}: {error.strerror or error}"


_stopped_by: int | None = None
"""The signal that asked this process to stop, once one has."""


def _stop_on_sigterm() -> None:
    """SIGTERM (kill, docker stop, a scheduler's time limit) stops a command the way Ctrl-C does:
    it unwinds, so temporary files are removed and the user is told how to continue."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: Any) -> None:
        global _stopped_by
        _stopped_by = signum
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, stop)


class _Parser(argparse.ArgumentParser):
    """Errors as one line naming the fix, with the closest option for a misspelt one.

    Abbreviations are off: ``--frozen-epoch 3`` is reported as a typo of ``--frozen-epochs``
    instead of being taken silently, and a new option can never change what an old one meant.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")

    def unknown_options(self, unknown: list[str]) -> NoReturn:
        options = [name for action in self._actions for name in action.option_strings]
        described = []
        for word in unknown:
            name = word.split("=", 1)[0]
            closest = difflib.get_close_matches(name, options, n=1, cutoff=0.6) if word.startswith("-") else []
            described.append(f"{word} (did you mean {closest[0]}?)" if closest else word)
        self.error(f"unrecognized arguments: {', '.join(described)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="transferkit", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _train_parser(subparsers)
    _compare_parser(subparsers)
    _evaluate_parser(subparsers)
    _predict_parser(subparsers)
    _report_parser(subparsers)
    _export_parser(subparsers)
    _serve_parser(subparsers)
    _summary_parser(subparsers)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        subparsers.choices[args.command].unknown_options(unknown)
    _tolerate_odd_file_names()
    _stop_on_sigterm()
    try:
        if args.command in ("train", "compare"):
            # Lightning sets its loggers to INFO when imported: import it first, then quiet them.
            import lightning  # noqa: F401
        _quiet_libraries(getattr(args, "verbose", False))
        return COMMANDS[args.command](args)
    except ConfigError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except TransferkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print("\ninterrupted", file=sys.stderr)
        return _exit_status(interrupt)
    except BrokenPipeError:
        # The reader (``| head``) has gone; Python would print a traceback flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:
        print(f"error: {_os_error(error)}", file=sys.stderr)
        return 1
    except Exception:
        # The stop raised inside a library that wrapped it in an error of its own (matplotlib,
        # drawing, turned one into a TypeError): it is still the stop the user asked for.
        if _stopped_by is None:
            raise
        print("\ninterrupted", file=sys.stderr)
        return 128 + _stopped_by


if __name__ == "__main__":
    sys.exit(main())
