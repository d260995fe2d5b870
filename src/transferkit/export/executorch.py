"""The ExecuTorch program (``.pte``) of a scored classifier: ``torch.export``, lowered to XNNPACK,
run by ``executorch.runtime`` (which takes torch tensors, so it needs torch, not a compiler).

The program takes one image at a time: with a dynamic batch axis, XNNPACK's delegate refused
batches of 16 and more ("Error resizing tensor at input 0", 0x10) whatever the axis's bound, and
crashed the process (a segmentation fault) when exported from a batch of 4. A phone or board runs
one image at a time anyway; a batch here is a loop.

The metadata is a constant method ``transferkit`` returning the JSON record, padded with spaces
so it can be rewritten in place (the unknown threshold refitted on the file's own scores)
without lowering the model again.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import RunFolderError
from transferkit.inference.onnx_runtime import ONNX_METADATA_KEY

METADATA_ROOM = 512
"""Spaces after the record: room for a rewritten record that is longer than the first."""


def write(module: Any, metadata: dict[str, Any], path: Path, calibration: list[np.ndarray] | None,
          quantize: str | None) -> None:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    size = metadata["preprocessing"]["input_size"]
    with torch.no_grad():
        exported = torch.export.export(module, (torch.zeros(1, *size),))
    record = json.dumps(metadata) + " " * METADATA_ROOM
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                          constant_methods={ONNX_METADATA_KEY: record}).to_executorch()
    path.write_bytes(program.buffer)


def _load(path: Path) -> tuple[Any, Any]:
    """(the program's forward method, its metadata record or None)."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(path))
    method = program.load_method("forward")
    if ONNX_METADATA_KEY not in program.method_names:
        return method, None
    return method, json.loads(program.load_method(ONNX_METADATA_KEY).execute([])[0])


def read_metadata(path: Path) -> Any:
    return _load(path)[1]


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """The record rewritten in place, in the room the first one left."""
    from executorch.runtime import Runtime

    old = Runtime.get().load_program(str(path)).load_method(ONNX_METADATA_KEY).execute([])[0].encode()
    new = json.dumps(metadata).encode()
    data = path.read_bytes()
    if len(new) > len(old) or data.count(old) != 1:
        raise RunFolderError(f"{path}: the metadata cannot be rewritten in place; export it again")
    path.write_bytes(data.replace(old, new.ljust(len(old))))


def load(path: Path) -> Any:
    import torch

    from transferkit.export.formats import read_exported
    from transferkit.inference.loading import predictor_from_metadata

    method, metadata = read_exported(path, "ExecuTorch program", _load)
    lock = threading.Lock()  # a loaded method runs one call at a time

    def forward(batch: np.ndarray) -> Any:
        with lock:
            each = [[output.numpy().copy() for output in method.execute([torch.from_numpy(batch[i:i + 1].copy())])]
                    for i in range(len(batch))]
        values = tuple(np.concatenate(parts) for parts in zip(*each))
        return values if len(values) > 1 else values[0]

    return predictor_from_metadata(forward, metadata, str(path))
