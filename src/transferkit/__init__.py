"""transferkit: a folder of labelled images in, an accurate, deployable image classifier out."""

from transferkit.config import DataConfig, ModelConfig, PhaseConfig, TrainConfig
from transferkit.data import DatasetIndex, discover
from transferkit.datasets import list_datasets, resolve_data_source
from transferkit.errors import ConfigError, DataError, RunFolderError, TransferkitError, WeightsUnavailableError
from transferkit.models import create_classifier, load_model
from transferkit.training import TrainResult, load_config, resume, train

__all__ = [
    "ConfigError",
    "DataConfig",
    "DataError",
    "DatasetIndex",
    "ModelConfig",
    "PhaseConfig",
    "RunFolderError",
    "TrainConfig",
    "TrainResult",
    "TransferkitError",
    "WeightsUnavailableError",
    "create_classifier",
    "discover",
    "list_datasets",
    "load_config",
    "load_model",
    "resolve_data_source",
    "resume",
    "train",
]
__version__ = "0.1.0"
