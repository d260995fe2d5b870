"""The LiteRT (formerly TensorFlow Lite) file of a scored classifier, converted by ``litert-torch``
and run by the ``ai-edge-litert`` interpreter, which needs no torch.

The knn unknown score's ``topk`` converts to a StableHLO sort that the interpreter has no kernel
for ("Didn't find op for builtin opcode 'STABLEHLO_SORT'"), so the file computes the k-th largest
similarity by taking the largest away k - 1 times: the same value, in operations it runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import RunFolderError
from transferkit.inference.onnx_runtime import ONNX_METADATA_KEY


def sort_free(scored: Any) -> Any:
    """``scored`` (a ``trust.unknown.ScoredClassifier``) with a knn score that needs no sort."""
    import torch
    import torch.nn.functional as F

    from transferkit.models.create import classify_pooled, forward_pooled
    from transferkit.trust.unknown import unknown_scores

    class SortFree(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scored = scored

        def forward(self, images: torch.Tensor) -> Any:
            inner = self.scored
            pooled = forward_pooled(inner.model, images)
            logits = classify_pooled(inner.model, pooled, 0.0) / inner.temperature
            if inner.method is None:
                return logits
            if inner.method != "knn":
                return logits, unknown_scores(inner.method, logits, pooled)
            similarity = F.normalize(pooled.float(), dim=1) @ inner.bank.T
            for _ in range(min(inner.neighbours, inner.bank.shape[0]) - 1):
                top = similarity.max(dim=1, keepdim=True).values
                # Only the first column holding the largest goes, so ties count as topk counts them.
                first = (similarity == top) & (torch.cumsum((similarity == top).to(similarity.dtype), dim=1) == 1)
                similarity = torch.where(first, torch.full_like(similarity, -2.0), similarity)
            return logits, 1 - similarity.max(dim=1).values

    return SortFree().eval()


def write(module: Any, metadata: dict[str, Any], path: Path, calibration: list[np.ndarray] | None,
          quantize: str | None) -> None:
    import litert_torch
    import torch

    size = metadata["preprocessing"]["input_size"]
    # The converter prints a progress line per step; transferkit says what it did once, at the end.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        converted = litert_torch.convert(sort_free(module), (torch.zeros(1, *size),))
        converted.export(str(path))
    write_metadata(path, metadata)


def _metadata_entry(model: Any) -> Any:
    return next((entry for entry in (model.metadata or []) if entry.name in (ONNX_METADATA_KEY, ONNX_METADATA_KEY.encode())),
                None)


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """The JSON record in the flatbuffer's own ``metadata`` list (name ``transferkit``), where
    TensorFlow Lite keeps a model's metadata."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(path.read_bytes(), 0))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata).encode(), np.uint8)
    entry = _metadata_entry(model)
    if entry is None:
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = ONNX_METADATA_KEY
        entry.buffer = len(model.buffers) - 1
        model.metadata = [*(model.metadata or []), entry]
    else:
        model.buffers[entry.buffer] = buffer
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def read_metadata(path: Path) -> Any:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == ONNX_METADATA_KEY.encode():
            return json.loads(bytes(model.Buffers(entry.Buffer()).DataAsNumpy()).decode())
    return None


def load(path: Path) -> Any:
    """A Predictor that runs the file in the LiteRT interpreter (XNNPACK on CPU); the batch axis
    is resized to each batch, one batch at a time."""
    from ai_edge_litert.interpreter import Interpreter

    from transferkit.inference.loading import predictor_from_metadata

    try:
        metadata = read_metadata(path)
        interpreter = Interpreter(model_path=str(path))
    except Exception as error:
        raise RunFolderError(f"{path} is not a readable LiteRT model ({str(error).splitlines()[0]})") from None
    if metadata is None:
        raise RunFolderError(f"{path} carries no class names or preprocessing; export it with `transferkit export RUN`")
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    # The outputs in the graph's order (logits, then the unknown score): the interpreter lists them by name.
    outputs = sorted(interpreter.get_output_details(), key=lambda detail: len(detail["shape"]), reverse=True)
    lock = threading.Lock()
    shape = [tuple(source["shape"])]

    def forward(batch: np.ndarray) -> Any:
        with lock:
            if tuple(batch.shape) != shape[0]:
                interpreter.resize_tensor_input(source["index"], batch.shape)
                interpreter.allocate_tensors()
                shape[0] = tuple(batch.shape)
            interpreter.set_tensor(source["index"], np.ascontiguousarray(batch, np.float32))
            interpreter.invoke()
            values = tuple(interpreter.get_tensor(detail["index"]).copy() for detail in outputs)
        return values if len(values) > 1 else values[0]

    return predictor_from_metadata(forward, metadata, str(path), int(outputs[0]["shape"][-1]))
