"""The command line: one command per public function, options generated from the config
dataclasses so ``--help`` and the Python API never drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from transferkit.config import DataConfig, ModelConfig, PhaseConfig, TrainConfig
from transferkit.errors import ConfigError, TransferkitError

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


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.8,0.16,0.04, got {text!r}") from None


def _converter(kind: Any) -> Any:
    text = str(kind)
    if "tuple" in text:
        return _fractions
    if "bool" in text:
        return _bool
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def _add_fields(parser: argparse.ArgumentParser, kind: type, prefix: str, dest_prefix: str, defaults: Any) -> None:
    group = parser.add_argument_group(dest_prefix or "run")
    for spec in dataclasses.fields(kind):
        if spec.name in TOP_LEVEL_SKIP and kind is TrainConfig:
            continue
        default = getattr(defaults, spec.name)
        help_text = spec.metadata.get("help", "")
        dest = f"{dest_prefix}.{spec.name}" if dest_prefix else spec.name
        if spec.metadata.get("positional"):
            parser.add_argument(dest, nargs="?", default=None, help=help_text, metavar="DATA")
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument(
            spec.metadata.get("flag") or _flag(prefix, spec.name),
            dest=dest,
            type=_converter(spec.type),
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {shown})",
        )


def _train_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a classifier on an image folder or a registered dataset",
        description="Two phases: a new head on frozen backbone features, then fine-tuning the top blocks.",
    )
    defaults = TrainConfig.__new__(TrainConfig)
    for spec in dataclasses.fields(TrainConfig):
        setattr(defaults, spec.name, spec.default_factory() if callable(spec.default_factory) else spec.default)
    for kind, prefix, attribute in SECTIONS:
        _add_fields(parser, kind, prefix, attribute, getattr(defaults, attribute))
    _add_fields(parser, TrainConfig, "", "", defaults)
    parser.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run from its folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return parser


def build_train_config(options: dict[str, Any]) -> TrainConfig:
    """TrainConfig from flat CLI-style options ({'data.source': ..., 'frozen.epochs': ...})."""
    sections = {
        "data": DataConfig(), "model": ModelConfig(),
        "frozen": dataclasses.replace(_default("frozen")), "finetune": dataclasses.replace(_default("finetune")),
    }
    top: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        if section:
            setattr(sections[section], name, value)
        else:
            top[name] = value
    top.update(sections)
    return TrainConfig(**top)


def _default(section: str) -> PhaseConfig:
    spec = {f.name: f for f in dataclasses.fields(TrainConfig)}[section]
    return spec.default_factory()  # type: ignore[misc]


def _print_train_summary(result: Any) -> None:
    metrics = result.metrics
    print(f"\nclasses ({len(result.classes)}): {', '.join(result.classes)}")
    for split, counts in result.counts.items():
        print(f"  {split:<5} {sum(counts.values()):>6} images  " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable or non-image files (see {result.run_dir / 'skipped.csv'})")
    best = metrics["phases"][result.best_phase]
    print(f"best validation accuracy: {best['best_val_acc']:.4f} ({result.best_phase} phase, epoch {best['best_epoch']})")
    print(f"validation accuracy of the saved model: {metrics['val']['accuracy']:.4f}  macro F1: {metrics['val']['macro_f1']:.4f}")
    if "test" in metrics:
        print(f"test accuracy: {metrics['test']['accuracy']:.4f}  macro F1: {metrics['test']['macro_f1']:.4f}")
    print(f"wall time: {metrics['train_seconds']:.1f} s")
    print(f"run folder: {result.run_dir}")


def _run_train(args: argparse.Namespace) -> int:
    from transferkit.training import resume, train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "verbose")}
    if args.resume:
        result = resume(args.resume)
    else:
        config = build_train_config(options)
        try:
            result = train(config)
        except KeyboardInterrupt:
            print(f"\ninterrupted; finish the run with: transferkit train --resume {config.output}", file=sys.stderr)
            return 130
    _print_train_summary(result)
    return 0


def _quiet_libraries(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transferkit").setLevel(logging.INFO)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TQDM_MININTERVAL", "0.5")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="transferkit", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _train_parser(subparsers)
    args = parser.parse_args(argv)
    _quiet_libraries(getattr(args, "verbose", False))
    try:
        if args.command == "train":
            return _run_train(args)
    except ConfigError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except TransferkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
