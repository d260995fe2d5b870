"""The ONNX file of a scored classifier, float or int8."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from transferkit._io import atomic_write
from transferkit.inference.onnx_runtime import ONNX_METADATA_KEY, export_onnx


def write_onnx(model: Any, metadata: dict[str, Any], path: Path, quantize: str | None) -> None:
    import onnx

    def write(tmp: Path) -> None:
        export_onnx(model, metadata["preprocessing"]["input_size"], tmp)
        if quantize == "int8":
            quantize_int8(tmp)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(metadata)})
        onnx.save(proto, str(tmp))

    atomic_write(path, write)


def quantize_int8(path: Path) -> None:
    """Dynamic int8 quantisation of the weights in place, after ORT's recommended pre-processing
    (shape inference and graph optimisation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    root = logging.getLogger()
    level = root.level
    # The quantiser logs a warning on the root logger for every shape tensor it rightly skips.
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as work:
            prepared = Path(work) / "prepared.onnx"
            quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
