"""The options of every command: generated from the config dataclasses for train and compare,
written out for the others."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from transferkit.config import (
    DEFAULT_MODEL,
    UNKNOWN_SCORES,
    DataConfig,
    ModelConfig,
    PhaseConfig,
    TrainConfig,
)
from transferkit.cli.config_file import LR_FIND_SKIP
from transferkit.cli.values import converter
from transferkit.data.registry import DATA_HELP

# (dataclass, flag prefix, TrainConfig attribute)
SECTIONS: list[tuple[type, str, str]] = [
    (DataConfig, "", "data"),
    (ModelConfig, "", "model"),
    (PhaseConfig, "frozen-", "frozen"),
    (PhaseConfig, "finetune-", "finetune"),
]
TOP_LEVEL_SKIP = {"data", "model", "frozen", "finetune", "preset_overrides"}


DESCRIPTION = """\
Train an image classifier on your own images, starting from a pretrained model, and check it
before you trust it.

Give it a folder with one sub-folder of images per class, or a CSV file of image paths and
labels. `transferkit train DATA` trains a new final layer on the pretrained model's features,
then fine-tunes the top of the model, and writes a run folder with the model, its scores on
images it never trained on, and report.html. `predict`, `evaluate`, `serve` and `export` use the
trained model; `audit` finds mislabelled, duplicated and odd images before you train; `compare`
trains several ways side by side; `lr-find` suggests a learning rate.

  transferkit train photos/                # photos/cat/*.jpg, photos/dog/*.jpg
  transferkit predict runs/<run> new.jpg
  transferkit train --config runs/<run>/config.yaml   # train that run again
"""
CONFIG_HELP = ("read options from a YAML file shaped like a run folder's config.yaml (its data.source is DATA "
               "when DATA is not given); flags given as well override it")


def add_commands(parser: argparse.ArgumentParser) -> Any:
    """``--version`` and every command's parser, in the order ``--help`` lists them; the subparsers."""
    from transferkit import __version__

    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (train_parser, lr_find_parser, compare_parser, audit_parser, evaluate_parser, calibrate_parser, predict_parser,
                report_parser, export_parser, serve_parser, summary_parser):
        add(subparsers)
    return subparsers


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}{name.replace('_', '-')}"


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
                help=f"{help_text} (default: {spec.metadata.get('cli_default') or ('on' if default else 'off')})",
            )
            continue
        group.add_argument(
            spec.metadata.get("flag") or _flag(prefix, spec.name),
            dest=dest,
            type=converter(spec.type),
            metavar=spec.name.upper(),
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {shown})",
        )


def _add_train_fields(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> TrainConfig:
    """DATA (optional: --resume or --config may name it), TrainConfig's flags but ``skip``, --config, -v."""
    parser.add_argument("source", nargs="?", default=None, help=DATA_HELP, metavar="DATA")
    defaults = TrainConfig()
    for kind, prefix, attribute in SECTIONS:
        # The frozen phase trains the new head alone, whatever its unfreeze says: no flag for it.
        fields = frozenset({"unfreeze"}) if attribute == "frozen" else frozenset()
        _add_fields(parser, kind, prefix, attribute, getattr(defaults, attribute), skip=fields)
    _add_fields(parser, TrainConfig, "", "", defaults, skip=skip)
    parser.add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return defaults


def train_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a classifier on an image folder, a manifest (CSV or JSON Lines) or a registered dataset",
        description="Two phases: a new head on frozen backbone features, then fine-tuning the top blocks.",
    )
    defaults = _add_train_fields(parser)
    parser.add_argument("--epochs", type=int, default=argparse.SUPPRESS, metavar="EPOCHS",
                        help="most epochs of both phases, each still stopped early by its patience; "
                             "--frozen-epochs and --finetune-epochs override it (default: "
                             f"{defaults.frozen.epochs} frozen, {defaults.finetune.epochs} fine-tuning)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run from its folder")
    return parser


def lr_find_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lr-find", help="suggest a learning rate: a short sweep's loss against the rate, plotted",
        description="The sweep of train's --frozen-lr auto or --finetune-lr auto with the same options (Lightning's "
        "lr_find: 100 steps from 1e-8 to 1): prints the rate where the loss falls fastest, writes the plot and a CSV.")
    parser.add_argument("--phase", choices=["frozen", "finetune"], default="frozen", help="frozen: the new head on "
                        "the cached features; finetune: the top blocks, after training the head (default: frozen)")
    parser.add_argument("--output", metavar="DIR", help="plot and CSV folder (default: runs/lr-find-<data>-<model>-<time>)")
    _add_train_fields(parser, skip=LR_FIND_SKIP)


def compare_parser(subparsers: Any) -> None:
    from transferkit.commands.compare import STRATEGIES

    parser = subparsers.add_parser(
        "compare", help="train one dataset with several strategies (and backbones) and compare them",
        description="Strategies: " + "; ".join(f"{name}: {text}" for name, text in STRATEGIES.items())
        + ". Every run gets the same split, seed, epoch budget and early stopping. Rerun to resume.",
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated strategies (default: {','.join(STRATEGIES)})")
    parser.add_argument("--models", help=f"comma-separated timm model names (default: --config's model.name, else {DEFAULT_MODEL})")
    parser.add_argument("--epochs", type=int, default=5, help="epochs for every phase of every run (default: 5)")
    parser.add_argument("--patience", type=int, default=3,
                        help="every phase stops after this many epochs without a lower validation loss (default: 3)")
    parser.add_argument("--unfreeze", default="auto",
                        help="blocks the fine-tune strategy unfreezes, as --finetune-unfreeze (default: auto)")
    parser.add_argument("--output", metavar="DIR", help="comparison folder (default: runs/compare-<data>)")
    parser.add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP + "; its phases are the strategies' own")
    parser.add_argument("source", nargs="?", default=None, help=DATA_HELP, metavar="DATA")
    defaults = TrainConfig()
    _add_fields(parser, DataConfig, "", "data", defaults.data, skip=frozenset({"splits_from"}))
    _add_fields(parser, ModelConfig, "", "model", defaults.model, skip=frozenset({"name", "hidden_size"}))
    parser.add_argument("--hidden-size", type=int, default=1024, help="hidden layer width of frozen-dense (default: 1024)")
    _add_fields(parser, TrainConfig, "", "", defaults, skip=frozenset({"output", "batchnorm"}))
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")


def audit_parser(subparsers: Any) -> None:
    from transferkit.audit.config import DATA_SKIP, MODEL_SKIP, AuditConfig

    parser = subparsers.add_parser(
        "audit", help="find mislabelled, duplicated, leaking and odd images before training",
        description="Label issues (confident learning on out-of-sample predictions), near-copies within and "
        "across splits and classes, outliers and class health, from the cached backbone features. Writes "
        "audit.csv (the input of train --exclude), audit.json, scores.csv and audit.html; never moves a file.",
    )
    parser.add_argument("source", nargs="?", default=None, help=DATA_HELP, metavar="DATA")
    defaults = AuditConfig()
    _add_fields(parser, DataConfig, "", "data", defaults.data, skip=DATA_SKIP)
    _add_fields(parser, ModelConfig, "", "model", defaults.model, skip=MODEL_SKIP)
    _add_fields(parser, AuditConfig, "", "", defaults, skip=frozenset({"data", "model"}))
    parser.add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP + "; the keys the audit has no use for are left out")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")


def evaluate_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="metrics of a trained run on one of its splits or on a labelled folder",
        description="Metrics of a run's model; writes metrics.json and predictions.csv.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder, or an exported model file (which needs DATA)")
    parser.add_argument("data", metavar="DATA", nargs="?", help="labelled folder DATA/<class>/*; default: the run's own split")
    parser.add_argument("--split", choices=["train", "val", "test"], help="split to evaluate (default: test, else val)")
    parser.add_argument("--output", metavar="DIR", help="folder for metrics.json and predictions.csv (default: RUN/evaluation/<name>)")
    _add_batch_options(parser, tta=True)


def _add_batch_options(parser: argparse.ArgumentParser, batches: str = "images per batch", tta: bool = False) -> None:
    if tta:
        parser.add_argument("--tta", action="store_true", help="average each image with its mirror image")
    parser.add_argument("--batch-size", type=int, default=64, help=f"{batches} (default: 64)")
    # None until the handler resolves it: a bar is for a person watching, never for a pipe or a log file.
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: on when stderr is a terminal)")


def predict_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict", help="top-k labels for images or folders of images",
        description="Top-k labels with probabilities for every image; unreadable files are listed and skipped.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder, its model/ folder, or an exported model file")
    parser.add_argument("inputs", metavar="IMAGE_OR_FOLDER", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=3, help="labels per image (default: 3)")
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format (default: table)")
    parser.add_argument("--reject", action=argparse.BooleanOptionalAction, default=True,
                        help="answer unknown for an image scored above the model's unknown threshold (default: on)")
    parser.add_argument("--explain", metavar="DIR",
                        help="also write a heat-map overlay PNG per image into DIR: where the model found its top "
                             "label (needs the run folder and pip install 'transferkit[explain]')")
    _add_batch_options(parser, tta=True)


def calibrate_parser(subparsers: Any) -> None:
    methods = [method for method in UNKNOWN_SCORES if method != "none"]
    parser = subparsers.add_parser(
        "calibrate", help="fit a run's temperature and unknown threshold again, on its validation split or a labelled folder",
        description="Refits the temperature (by log loss) and the unknown threshold, and saves them in the run's model "
                    "folder; predict, evaluate, serve and later exports use them.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder")
    parser.add_argument("data", metavar="DATA", nargs="?", help="labelled folder DATA/<class>/*; default: the run's validation split")
    parser.add_argument("--unknown-score", choices=methods, help="the unknown score (default: the model's own, else knn)")
    parser.add_argument("--unknown-keep", type=float, help="share of DATA's images the threshold keeps (default: the model's own, else 0.95)")
    _add_batch_options(parser)


def report_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report", help="the HTML report of one run, or of several side by side",
        description="Figures and one self-contained HTML file with the configuration, data, metrics and figures.",
    )
    parser.add_argument("runs", metavar="RUN", nargs="+", help="run folders")
    parser.add_argument("--output", metavar="FILE", help="HTML file (default: RUN/report.html for one run, ./report.html for several)")


def export_parser(subparsers: Any) -> None:
    from transferkit.commands.export import FORMATS, MAX_ACCURACY_DROP, QUANTIZATIONS

    parser = subparsers.add_parser(
        "export", help="export a run's model to ONNX, OpenVINO, LiteRT, ExecuTorch or torch.export, float or int8",
        description="Export a run's model; the file is run in its own runtime on the validation split and kept only if it agrees.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder")
    parser.add_argument("--format", choices=[*FORMATS, "all"], default="onnx", help="file format; all: every installed one (default: onnx)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="int8: static, calibrated on training images (onnx, openvino); int8-dynamic: weights only (onnx)")
    parser.add_argument("--output", metavar="FILE", help="file to write, a folder with --format all (default: RUN/export/model.<format>)")
    parser.add_argument("--max-accuracy-drop", type=float, default=MAX_ACCURACY_DROP, metavar="POINTS",
                        help=f"refuse a file more than POINTS less accurate than the model (default: {MAX_ACCURACY_DROP:g})")
    _add_batch_options(parser, "images per batch in the check")


def serve_parser(subparsers: Any) -> None:
    from transferkit.commands.serve_app import ServeLimits

    defaults = ServeLimits()
    parser = subparsers.add_parser(
        "serve", help="a web page and REST API for a run or an exported model file",
        description="GET / (a page to drop an image on), POST /predict, GET /model, GET /health.",
    )
    parser.add_argument("model", metavar="RUN_OR_FILE", help="run folder or exported model file (.onnx, .xml, .tflite, .pte, .pt2)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help=f"labels per image (default: {defaults.top_k})")
    parser.add_argument("--reject", action=argparse.BooleanOptionalAction, default=True,
                        help="answer unknown for an image scored above the model's unknown threshold (default: on)")
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


def summary_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "summary", help="the model layer by layer: type, output shape, parameters, which phase trains it",
        description="Prints the table and writes it with an architecture diagram (architecture.txt, architecture.png).",
    )
    parser.add_argument("source", metavar="RUN_OR_MODEL_NAME", help="run folder, or any timm model name (trained with the default recipe)")
    parser.add_argument("--depth", type=int, help="levels of sub-modules to list (default: down to the blocks fine-tuning unfreezes)")
    parser.add_argument("--num-classes", type=int, default=1000, help="head size for a model name (default: 1000)")
    parser.add_argument("--output", metavar="DIR", help="folder for the files (default: the run folder, or . for a model name)")
