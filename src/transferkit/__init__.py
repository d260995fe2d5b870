"""transferkit: a folder of labelled images in, an accurate, deployable image classifier out."""

from transferkit.config import DataConfig, ModelConfig, PhaseConfig, TrainConfig
from transferkit.data import DatasetIndex, discover
from transferkit.datasets import list_datasets, resolve_data_source
from transferkit.evaluate import Evaluation, PredictionResult, compute_metrics, evaluate, predict
from transferkit.errors import ConfigError, DataError, RunFolderError, TransferkitError, WeightsUnavailableError
from transferkit.inference import Classifier, load_classifier
from transferkit.models import create_classifier, load_model
from transferkit.report import write_report
from transferkit.training import TrainResult, load_config, resume, train

__all__ = [
    "Classifier",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DatasetIndex",
    "Evaluation",
    "ModelConfig",
    "PhaseConfig",
    "PredictionResult",
    "RunFolderError",
    "TrainConfig",
    "TrainResult",
    "TransferkitError",
    "WeightsUnavailableError",
    "compute_metrics",
    "create_classifier",
    "discover",
    "evaluate",
    "list_datasets",
    "load_classifier",
    "load_config",
    "load_model",
    "predict",
    "resolve_data_source",
    "resume",
    "train",
    "write_report",
]
__version__ = "0.1.0"
