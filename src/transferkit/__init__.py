"""transferkit: a folder of labelled images in, an accurate, deployable image classifier out.

Names load on first use (PEP 562), so ``import transferkit`` and the command line start
without torch, and an exported ``.onnx`` model runs where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Functions named like their module load now: importing the submodule later would otherwise
# bind ``transferkit.evaluate`` to the module, not the function. These modules are torch-free.
from transferkit.audit.config import AuditConfig  # noqa: E402
from transferkit.audit.findings import AuditResult  # noqa: E402
from transferkit.commands.audit import audit  # noqa: E402
from transferkit.commands.calibrate import calibrate  # noqa: E402
from transferkit.commands.compare import compare  # noqa: E402
from transferkit.run.comparison import Comparison  # noqa: E402
from transferkit.commands.predict import PredictionResult, predict  # noqa: E402
from transferkit.commands.evaluate import evaluate  # noqa: E402
from transferkit.inference.metrics import Evaluation, compute_metrics  # noqa: E402
from transferkit.commands.export import ExportResult, export  # noqa: E402

_EXPORTS = {
    "ConfigError": "errors",
    "DataConfig": "config",
    "DataError": "errors",
    "DatasetIndex": "data.index",
    "ModelConfig": "config",
    "PhaseConfig": "config",
    "Predictor": "inference.predictor",
    "RunFolderError": "errors",
    "TrainConfig": "config",
    "TrainResult": "commands.train",
    "TransferkitError": "errors",
    "WeightsUnavailableError": "errors",
    "create_app": "commands.serve_app",
    "create_classifier": "models.create",
    "discover": "data.folders",
    "list_datasets": "data.registry",
    "load_classifier": "inference.loading",
    "load_predictor": "inference.loading",
    "load_config": "run.folder",
    "LrFindResult": "commands.lr_find",
    "lr_find": "commands.lr_find",
    "load_model": "models.folder",
    "resolve_data_source": "data.registry",
    "resume": "commands.train",
    "summarize": "commands.summary",
    "train": "commands.train",
    "write_report": "reporting.report",
}
__all__ = sorted([*_EXPORTS, "AuditConfig", "AuditResult", "audit", "calibrate", "Comparison", "compare", "Evaluation", "ExportResult", "PredictionResult", "compute_metrics", "evaluate", "export", "predict"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"transferkit.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from transferkit.config import DataConfig, ModelConfig, PhaseConfig, TrainConfig
    from transferkit.data.folders import discover
    from transferkit.data.index import DatasetIndex
    from transferkit.data.registry import list_datasets, resolve_data_source
    from transferkit.errors import ConfigError, DataError, RunFolderError, TransferkitError, WeightsUnavailableError
    from transferkit.inference.predictor import Predictor
    from transferkit.inference.loading import load_classifier, load_predictor
    from transferkit.models.create import create_classifier
    from transferkit.models.folder import load_model
    from transferkit.reporting.report import write_report
    from transferkit.commands.serve_app import create_app
    from transferkit.commands.summary import summarize
    from transferkit.run.folder import load_config
    from transferkit.commands.lr_find import LrFindResult, lr_find
    from transferkit.commands.train import TrainResult, resume, train
