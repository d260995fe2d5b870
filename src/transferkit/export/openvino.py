"""The OpenVINO IR of a scored classifier (``model.xml``, weights in ``model.bin`` beside it):
float, or int8 through NNCF's post-training quantisation on training images.

Run in float32: on a CPU with AVX512-BF16 OpenVINO infers in bfloat16 unless told otherwise,
which moved logits by up to 0.24 here, so the file records ``f32`` and the loader asks for it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import RunFolderError
from transferkit.export.onnx import compress_bank
from transferkit.inference.onnx_runtime import ONNX_METADATA_KEY, export_onnx

PRECISION_KEY = "inference_precision"


def write(module: Any, metadata: dict[str, Any], path: Path, calibration: list[np.ndarray] | None,
          quantize: str | None) -> None:
    """``module`` as IR at ``path`` (its ``.bin`` beside it); converted from the ONNX export, so
    the input and outputs keep their names (``input``, ``logits``, ``unknown_score``)."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as work:
        onnx_file = Path(work) / "model.onnx"
        export_onnx(module, metadata["preprocessing"]["input_size"], onnx_file)
        if quantize == "int8":
            compress_bank(onnx_file, getattr(module, "bank", None))
        model = ov.convert_model(str(onnx_file))
    if quantize == "int8":
        import nncf

        batches = calibration or []
        nncf.set_log_level(logging.ERROR)
        # Only the backbone's convolutions: the head and unknown score stay float, as in ONNX's int8.
        # NNCF draws a progress bar per step; transferkit says what it did once, at the end.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = nncf.quantize(model, nncf.Dataset(batches), subset_size=max(1, len(batches)),
                                  ignored_scope=nncf.IgnoredScope(types=["MatMul", "TopK", "Softmax"], validate=False))
    _save(model, {**metadata, PRECISION_KEY: "f32"}, path)


def _save(model: Any, metadata: dict[str, Any], path: Path) -> None:
    import openvino as ov

    model.set_rt_info(json.dumps(metadata), [ONNX_METADATA_KEY])
    # The default halves the weights to float16, which would move a float file's answers.
    ov.save_model(model, str(path), compress_to_fp16=False)


def read_metadata(path: Path) -> Any:
    import openvino as ov

    model = ov.Core().read_model(str(path))
    if not model.has_rt_info([ONNX_METADATA_KEY]):
        return None
    return json.loads(model.get_rt_info([ONNX_METADATA_KEY]).astype(str))


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import openvino as ov

    model = ov.Core().read_model(str(path))
    precision = json.loads(model.get_rt_info([ONNX_METADATA_KEY]).astype(str)).get(PRECISION_KEY, "f32")
    # Saved to a new pair, then moved over: the .bin is read lazily while the model is alive.
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        fresh = Path(work) / path.name
        _save(model, {**metadata, PRECISION_KEY: precision}, fresh)
        del model
        os.replace(fresh.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(fresh, path)


def load(path: Path) -> Any:
    """A Predictor that runs the IR in OpenVINO on CPU; needs no torch."""
    import openvino as ov

    from transferkit.inference.loading import predictor_from_metadata

    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as error:
        raise RunFolderError(f"{path} is not a readable OpenVINO model ({str(error).splitlines()[0]})") from None
    if not model.has_rt_info([ONNX_METADATA_KEY]):
        raise RunFolderError(f"{path} carries no class names or preprocessing; export it with `transferkit export RUN`")
    metadata = json.loads(model.get_rt_info([ONNX_METADATA_KEY]).astype(str))
    precision = metadata.pop(PRECISION_KEY, "f32")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    outputs = compiled.outputs
    local = threading.local()  # an infer request serves one thread at a time

    def forward(batch: np.ndarray) -> Any:
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        results = local.request.infer({0: batch})
        values = tuple(np.array(results[output]) for output in outputs)
        return values if len(values) > 1 else values[0]

    shape = model.outputs[0].get_partial_shape()
    classes = shape[1].get_length() if shape.rank.get_length() == 2 and shape[1].is_static else None
    return predictor_from_metadata(forward, metadata, str(path), classes)
