"""The ``torch.export`` program (``.pt2``) of a scored classifier, TorchScript's successor
upstream: reloaded by ``torch.export.load`` anywhere torch runs, or compiled ahead of time by
AOTInductor. Exported from a batch of 2: a batch of 1 would fix the batch axis at 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

METADATA_FILE = "transferkit.json"


def write(module: Any, metadata: dict[str, Any], path: Path, calibration: list[np.ndarray] | None,
          quantize: str | None) -> None:
    import torch

    size = metadata["preprocessing"]["input_size"]
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        exported = torch.export.export(module, (torch.zeros(2, *size),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})


def _load(path: Path) -> tuple[Any, Any]:
    import warnings

    import torch

    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No complete tensor found in the group", about GPU weights
        exported = torch.export.load(str(path), extra_files=extra)
    return exported, json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else None


def read_metadata(path: Path) -> Any:
    return _load(path)[1]


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import torch

    exported, _ = _load(path)
    torch.export.save(exported, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})


def load(path: Path) -> Any:
    import torch

    from transferkit.export.formats import read_exported
    from transferkit.inference.loading import predictor_from_metadata

    exported, metadata = read_exported(path, "torch.export program", _load)
    module = exported.module()  # an exported module refuses .eval(): it was traced in eval mode

    def forward(batch: np.ndarray) -> Any:
        with torch.no_grad():
            outputs = module(torch.from_numpy(batch))
        return tuple(output.numpy() for output in outputs) if isinstance(outputs, tuple) else outputs.numpy()

    return predictor_from_metadata(forward, metadata, str(path))
