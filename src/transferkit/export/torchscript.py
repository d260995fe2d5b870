"""TorchScript (deprecated upstream: ``torch.jit`` gives way to ``torch.export``, see
``export/pt2.py``); kept for C++ libtorch and older mobile runtimes while it is not the default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

TORCHSCRIPT_METADATA_FILE = "transferkit.json"


def write(module: Any, metadata: dict[str, Any], path: Path, calibration: list[np.ndarray] | None,
          quantize: str | None) -> None:
    import warnings

    import torch

    size = metadata["preprocessing"]["input_size"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the deprecation warning: said once, by ``transferkit export``
        traced = torch.jit.trace(module.eval(), torch.zeros(1, *size))
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})


def _load(path: Path) -> tuple[Any, Any]:
    import warnings

    import torch

    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[TORCHSCRIPT_METADATA_FILE]) if extra[TORCHSCRIPT_METADATA_FILE] else None


def read_metadata(path: Path) -> Any:
    return _load(path)[1]


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import warnings

    import torch

    module, _ = _load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, str(path), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})


def load(path: Path) -> Any:
    from transferkit.export.formats import read_exported
    from transferkit.inference.loading import predictor_from_metadata
    from transferkit.inference.predictor import torch_forward

    module, metadata = read_exported(path, "TorchScript file", _load)
    return predictor_from_metadata(torch_forward(module, "cpu"), metadata, str(path))
