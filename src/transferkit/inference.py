"""Batch inference over image files: backbone features for the frozen phase, logits for
evaluation. On CPU the module runs through ONNX Runtime, measured 4x faster than eager PyTorch
for EfficientNet-Lite0 on a 2-core machine; eager PyTorch (channels_last) is the fallback."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.data import ImageDataset, create_transform, resize_side

log = logging.getLogger(__name__)


def onnx_session(module: nn.Module, input_size: tuple[int, ...], path: Path | None = None) -> Any | None:
    """Export ``module`` with a dynamic batch axis and open an ORT session; None if either fails."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    module = module.eval()
    with tempfile.TemporaryDirectory() as work:
        target = path or Path(work) / "module.onnx"
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (torch.zeros(1, *input_size),),
                    str(target),
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.log_severity_level = 3
            return ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # an architecture ONNX cannot express: eager still works
            log.info("ONNX export of %s failed (%s); using eager PyTorch", type(module).__name__, error)
            return None


def image_loader(
    items: list[tuple[str, int]],
    preprocessing: dict[str, Any],
    batch_size: int,
    num_workers: int,
    augment: str = "none",
    shuffle: bool = False,
    sampler: Any = None,
) -> DataLoader:
    dataset = ImageDataset(items, create_transform(preprocessing, augment), min_side=resize_side(preprocessing))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def run_module(
    module: nn.Module,
    items: list[tuple[str, int]],
    preprocessing: dict[str, Any],
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    progress: bool = False,
    description: str = "",
) -> torch.Tensor:
    """Outputs of ``module`` for every image, in order, without augmentation."""
    from tqdm.auto import tqdm

    if not items:
        return torch.empty(0)
    loader = image_loader(items, preprocessing, batch_size, num_workers)
    session = onnx_session(module, preprocessing["input_size"]) if device == "cpu" else None
    if session is None:
        module = module.eval().to(device)
        if device == "cpu":
            module = module.to(memory_format=torch.channels_last)
    outputs = []
    with torch.inference_mode():
        for images, _ in tqdm(loader, desc=description, disable=not progress, leave=False, unit="batch"):
            if session is not None:
                outputs.append(torch.from_numpy(session.run(None, {"input": images.numpy()})[0]))
            else:
                if device == "cpu":
                    images = images.contiguous(memory_format=torch.channels_last)
                outputs.append(module(images.to(device)).float().cpu())
    return torch.cat(outputs)


def softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=1).numpy()
