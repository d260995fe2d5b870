"""TorchScript (deprecated upstream, kept while it is not the default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transferkit._io import atomic_write
from transferkit.inference.loading import predictor_from_metadata
from transferkit.inference.predictor import Predictor, torch_forward

TORCHSCRIPT_METADATA_FILE = "transferkit.json"


def write_torchscript(model: Any, metadata: dict[str, Any], path: Path) -> None:
    import warnings

    import torch

    size = metadata["preprocessing"]["input_size"]
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit is deprecated upstream in favour of torch.export, but still runs everywhere
        # TorchScript does (C++ libtorch, older mobile runtimes), which is why people ask for it.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.zeros(1, *size))
    extra = {TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)}
    atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files=extra))


def load_torchscript(path: Path) -> Predictor:
    import warnings

    import torch

    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return predictor_from_metadata(torch_forward(module, "cpu"), json.loads(extra[TORCHSCRIPT_METADATA_FILE]), str(path))
