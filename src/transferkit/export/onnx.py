"""The ONNX file of a scored classifier: float, static int8 (the default int8: activations and
weights in int8, calibrated on training images) or dynamic int8 (kept for the record: weights
only, about 10x slower than float on a CPU)."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.inference.onnx_runtime import ONNX_INPUT, ONNX_METADATA_KEY, export_onnx


def write(module: Any, metadata: dict[str, Any], path: Path, calibration: list[np.ndarray] | None,
          quantize: str | None) -> None:
    """``module`` as ONNX at ``path`` (written in place: the caller writes to a temporary name)."""
    export_onnx(module, metadata["preprocessing"]["input_size"], path)
    if quantize == "int8":
        quantize_static_int8(path, calibration or [])
        compress_bank(path, getattr(module, "bank", None))
    elif quantize == "int8-dynamic":
        quantize_dynamic_int8(path)
    write_metadata(path, metadata)


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(metadata)})
    onnx.save(proto, str(path))


def load(path: Path) -> Any:
    from transferkit.inference.loading import load_onnx_predictor

    return load_onnx_predictor(path)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # The quantiser logs a warning on the root logger for every shape tensor it rightly skips.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_static_int8(path: Path, calibration: list[np.ndarray]) -> None:
    """Static int8 in place: QDQ, weights int8 per channel, activations uint8 (U8S8, the faster on
    x86 with VNNI: measured against S8S8 in benchmarks/RESULTS.md), MinMax ranges of the
    ``calibration`` batches (training images, never the validation images that score the file).

    Only the convolutions and the operations between them are quantised: the head and the
    unknown score (a softmax, a normalised product with the training features, a top-k) stay
    float, so the score keeps its resolution for a threshold set on it."""
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {ONNX_INPUT: batch}

    with _quiet_root_logger(), tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared))
        quantize_static(
            str(prepared), str(path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType[ACTIVATIONS], weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=STATIC_OPS,
        )


STATIC_OPS: list[str] | None = ["Conv", "Add", "Mul", "Sigmoid", "HardSigmoid", "Clip", "Relu", "GlobalAveragePool",
                                 "ReduceMean"]
"""What static int8 quantises: a CNN backbone's operations (see ``quantize_static_int8``); None is every one."""

ACTIVATIONS = "QUInt8"
"""Static int8's activation type (ONNX Runtime's QuantType): U8S8, measured faster than S8S8 here."""


def quantize_dynamic_int8(path: Path) -> None:
    """Dynamic int8 quantisation of the weights in place, after ORT's recommended pre-processing.
    Its convolutions become ``ConvInteger``, which has no fast depthwise kernel: about 10x slower
    than float on a 2-core CPU (benchmarks/RESULTS.md), so it is a named choice, not the default."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet_root_logger(), tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QInt8)


def int8_rows(bank: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``bank`` as int8 with one float32 scale per feature vector (vectors along ``axis``): a
    unit vector's 1,280 values rounded to 1/127 of its largest, which moves a cosine similarity by
    about 1e-3, far less than int8 activations move the features it is compared with."""
    largest = np.abs(bank).max(axis=axis, keepdims=True)
    scale = np.where(largest > 0, largest / 127, 1).astype(np.float32)
    return np.round(bank / scale).astype(np.int8), scale


def compress_bank(path: Path, bank: Any) -> None:
    """The knn score's training features stored as int8 with a scale per image, in place: in float32
    they are most of a static int8 file (2,934 images x 1,280 features are 15 MB against 4 MB of
    int8 weights). A Cast and a Mul give them back in float; ONNX Runtime folds both when it loads
    the file, so inference pays nothing. Nothing to do without a bank."""
    import onnx
    from onnx import numpy_helper

    if bank is None or not bank.numel():
        return
    expected = bank.detach().cpu().numpy()
    proto = onnx.load(str(path))
    graph = proto.graph
    for initializer in graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT or sorted(initializer.dims) != sorted(expected.shape):
            continue
        values = numpy_helper.to_array(initializer)
        # The exporter folds ``bank.T``: the feature vectors lie along the columns, or the rows if it did not.
        axis = next((axis for axis, same in ((0, expected.T), (1, expected)) if np.array_equal(values, same)), None)
        if axis is not None:
            break
    else:
        return
    name = initializer.name
    quantized, scale = int8_rows(values, axis=axis)
    graph.initializer.remove(initializer)
    graph.initializer.extend([numpy_helper.from_array(quantized, f"{name}_int8"),
                              numpy_helper.from_array(scale, f"{name}_scale")])
    for node in reversed([
        onnx.helper.make_node("Cast", [f"{name}_int8"], [f"{name}_float"], to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("Mul", [f"{name}_float", f"{name}_scale"], [name]),
    ]):
        graph.node.insert(0, node)
    onnx.save(proto, str(path))


def read_metadata(path: Path) -> Any:
    import onnx

    found = {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(found[ONNX_METADATA_KEY]) if ONNX_METADATA_KEY in found else None
