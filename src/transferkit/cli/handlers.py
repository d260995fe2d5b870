"""One handler per command: it builds what the options describe, calls the public function and
prints what came back."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from transferkit.cli.config_file import (
    LR_FIND_OPTIONS,
    TRAIN_OPTIONS,
    option_types,
    read_config_file,
    resume_conflict,
)
from transferkit.cli.console import (
    exit_status,
    os_error,
    print_metrics,
    print_predictions,
    print_skipped,
    print_train_summary,
)
from transferkit.config import TrainConfig
from transferkit.data.registry import source_problems
from transferkit.errors import ConfigError, raise_together
from transferkit.run.folder import RunFolder


def _train_config(source: str | None, options: dict[str, Any]) -> TrainConfig:
    """The config the flags describe; a missing DATA is reported with every other problem."""
    return raise_together(source_problems(source), lambda: TrainConfig.from_options(options))


def _options(
    args: argparse.Namespace, accepted: dict[str, str], own: tuple[str, ...] = ()
) -> tuple[str | None, dict[str, Any]]:
    """DATA and the options (the flags but ``own``) over ``--config``'s, --progress resolved."""
    options = {k: v for k, v in vars(args).items() if k not in ("command", "source", "verbose", "config", *own)}
    source = args.source
    if args.config:
        from transferkit.audit.config import AuditConfig

        source, from_file = read_config_file(args.config, accepted, option_types(TrainConfig, AuditConfig))
        source, options = args.source or source, {**from_file, **options}
    # Progress bars only for a person watching: piped to a file, the epoch lines are the whole log.
    options["progress"] = _progress(options.get("progress"))
    return source, options


def _progress(given: bool | None) -> bool:
    """--progress as given, else on only where a person watches stderr: a bar is never for a pipe or a log."""
    return sys.stderr.isatty() if given is None else bool(given)


def _how_to_finish(output: str | None) -> str:
    if output and RunFolder(output).is_run():
        return f"finish the run with: transferkit train --resume {output}"
    return "nothing was trained yet; run the same command again"


def _run_train(args: argparse.Namespace) -> int:
    started = time.perf_counter()  # before the imports: torch and Lightning take seconds
    from transferkit.commands.train import resolve_run_dir, resume, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "source", "resume", "verbose", "config")}
    conflict = args.resume and resume_conflict(args.resume, args.source, args.config, given)
    if conflict:
        raise ConfigError([conflict])
    source, options = _options(args, TRAIN_OPTIONS, own=("resume",))
    config = None if args.resume else _train_config(source, options)
    if config is not None:  # named here, so that a stopped run can say where it is
        config = dataclasses.replace(config, output=str(resolve_run_dir(source, config)))
    output = args.resume if config is None else config.output
    try:
        result = resume(args.resume, progress=options["progress"]) if config is None else train(source, config)
    except KeyboardInterrupt as interrupt:
        print(f"\ninterrupted; {_how_to_finish(output)}", file=sys.stderr)
        return exit_status(interrupt)
    except OSError as error:  # a full disk or a folder that became unwritable, mid-run
        print(f"error: {os_error(error)}; {_how_to_finish(output)}", file=sys.stderr)
        return 1
    if result.metrics:  # empty on the other processes of a multi-process run
        print_train_summary(result, time.perf_counter() - started)
    return 0


def _run_lr_find(args: argparse.Namespace) -> int:
    from transferkit.commands.lr_find import lr_find

    source, options = _options(args, LR_FIND_OPTIONS, own=("phase", "output"))
    config = _train_config(source, options)
    print(lr_find(source, config, phase=args.phase, output=args.output).line())  # type: ignore[arg-type]
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from transferkit.commands.compare import compare

    own = ("strategies", "models", "epochs", "patience", "unfreeze", "output", "hidden_size")
    # Each strategy sets the phases, the batch norm and the run folders; a file's say in them is left out.
    accepted = {key: kind for key, kind in TRAIN_OPTIONS.items()
                if key not in ("output", "batchnorm", "data.splits_from", "model.hidden_size")}
    source, options = _options(args, accepted, own)
    models = args.models or options.pop("model.name", None)  # else the preset's, else the default
    options.pop("model.name", None)
    problems = source_problems(source)
    if problems:
        raise ConfigError(problems)
    try:
        comparison = compare(
            source,
            strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
            models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
            epochs=args.epochs, output=args.output, patience=args.patience, hidden_size=args.hidden_size,
            unfreeze=args.unfreeze, options=options,
        )
    except KeyboardInterrupt as interrupt:
        print("\ninterrupted; rerun the same command to continue (finished runs are kept)", file=sys.stderr)
        return exit_status(interrupt)
    print(comparison.table())
    skipped = comparison.skipped()
    if skipped:
        print(f"\nskipped {len(skipped)} unreadable, non-image or duplicate files (see {comparison.skipped_list})")
    print(f"\ncomparison written to {comparison.output} (comparison.csv, comparison.html)")
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    from transferkit.audit.config import DATA_SKIP, MODEL_SKIP, AuditConfig
    from transferkit.commands.audit import audit

    skipped = {f"data.{name}" for name in DATA_SKIP} | {f"model.{name}" for name in MODEL_SKIP} | {"output"}
    accepted = {key: kind for key, kind in option_types(AuditConfig).items() if key not in skipped}
    source, options = _options(args, accepted)
    config = raise_together(source_problems(source), lambda: AuditConfig.from_options(options))
    result = audit(source, config)
    print_skipped(result.skipped)
    print(result.line())
    for health in result.health:
        for problem in health.problems:
            print(f"  class {health.name}: {problem}")
    written = ", ".join(path.name for path in (result.csv_file, result.json_file, result.html_file) if path.exists())
    print(f"written to {result.output} ({written}); nothing was moved or deleted")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from transferkit.commands.evaluate import evaluate

    evaluation = evaluate(
        args.run, args.data, split=args.split, output=args.output, tta=args.tta,
        batch_size=args.batch_size, progress=_progress(args.progress),
    )
    print_skipped(evaluation.skipped)
    print_metrics(evaluation.metrics, f"{evaluation.name}: {evaluation.metrics['images']} images")
    print(f"\nwritten to {evaluation.output}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from transferkit.commands.predict import predict
    from transferkit.reporting.explain import load_explainer, write_overlays

    if args.top_k < 1:
        raise ConfigError([f"--top-k must be 1 or more, got {args.top_k}"])
    # Loaded before predicting, so a .onnx input or a missing grad-cam fails before any work.
    explainer = load_explainer(args.run) if args.explain else None
    result = predict(args.run, args.inputs, top_k=args.top_k, batch_size=args.batch_size, tta=args.tta,
                     progress=_progress(args.progress), reject=args.reject)
    print_skipped(result.skipped)
    print_predictions(result, args.format, args.top_k)
    if not result.predictions:
        print("error: no readable images among the inputs", file=sys.stderr)
        return 2
    if explainer is not None:
        written = write_overlays(explainer.explain([p.path for p in result.predictions], unreadable={}), args.explain)
        print(f"{len(written)} heat-map overlays written to {args.explain}", file=sys.stderr)
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from transferkit.commands.calibrate import calibrate

    trust, skipped = calibrate(args.run, args.data, unknown_score=args.unknown_score, unknown_keep=args.unknown_keep,
                                 batch_size=args.batch_size, progress=_progress(args.progress))
    print_skipped(skipped)
    calibration, rejection = trust.calibration, trust.rejection
    assert calibration is not None and rejection is not None  # recalibrate fits both
    print(f"fitted on {calibration.images} images of {calibration.fitted_on}")
    print(f"  temperature   {calibration.temperature:.4f}")
    print(f"  ECE           {calibration.ece_before:.4f} before, {calibration.ece_after:.4f} after")
    print(f"  log loss      {calibration.log_loss_before:.4f} before, {calibration.log_loss_after:.4f} after")
    print(f"  unknown       {rejection.method} score above {rejection.threshold:.4g} "
          f"(keeps {rejection.kept:.1%} of these images)")
    print(f"saved in {args.run}; the run's evaluations still show the old ones until `transferkit evaluate "
          f"{args.run} --split val` (and test) writes them again, then `transferkit report {args.run}`; "
          "exports made before carry the old ones until exported again")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from transferkit.commands.export import export, export_all, export_table

    options = {"batch_size": args.batch_size, "progress": _progress(args.progress), "max_accuracy_drop": args.max_accuracy_drop}
    if args.format == "all":
        if args.quantize:
            raise ConfigError(["--format all writes float and int8 of every installed format; drop --quantize"])
        outcome = export_all(args.run, output=args.output, **options)
        print(export_table(outcome.results))
        for name, reason in outcome.failed.items():
            print(f"{name}: not written: {reason}")
        for name, install in outcome.missing.items():
            print(f"{name}: not installed here ({install})")
        return 1 if outcome.failed else 0
    result = export(args.run, format=args.format, quantize=args.quantize, output=args.output, **options)
    print(f"exported {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.name})")
    print(f"checked in its own runtime on {result.images} validation images against the eager float model:")
    print(f"  max |probability difference|  {result.max_abs_diff:.2e}")
    if result.max_score_diff is not None:
        print(f"  max |unknown score difference|  {result.max_score_diff:.2e}")
    print(f"  accuracy  exported {result.accuracy:.4f}  eager {result.reference_accuracy:.4f}  "
          f"change {result.accuracy_change:+.4f}")
    if result.unknown_agreement is not None:
        print(f"  unknown answer agrees on {result.unknown_agreement:.2%} of images (threshold refitted on the "
              f"file's own scores: {result.threshold:.4g})")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from transferkit.commands.serve import listen, run_app
    from transferkit.commands.serve_app import ServeLimits, create_app

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
    # The port is bound and the model loaded before the address is printed: a port that is taken or
    # a model that cannot be served is the only line.
    app = create_app(args.model, limits, args.reject)
    listener = listen(args.host, args.port)
    print(f"serving {args.model} on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    run_app(app, listener, limits)
    return 0


def _run_summary(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transferkit.commands.summary import summarize, write_summary

    summary = summarize(args.source, depth=args.depth, num_classes=args.num_classes)
    is_run = RunFolder(args.source).has_model()
    folder = Path(args.output) if args.output else Path(args.source) if is_run else Path(".")
    stem = "architecture" if is_run else args.source.replace("/", "_").replace(":", "_") + "-architecture"
    print(summary.table())
    table, image = write_summary(summary, folder, stem)
    print(f"\nwritten to {table} and {image}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from transferkit.reporting.report import write_report

    path = write_report(args.runs, args.output)
    print(f"report written to {path}")
    return 0


COMMANDS = {
    "train": _run_train, "lr-find": _run_lr_find, "evaluate": _run_evaluate, "predict": _run_predict, "report": _run_report,
    "export": _run_export, "serve": _run_serve, "summary": _run_summary, "compare": _run_compare,
    "audit": _run_audit, "calibrate": _run_calibrate,
}
