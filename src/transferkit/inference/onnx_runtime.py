"""ONNX export and the on-disk cache of exports, shared by feature extraction, inference and
``transferkit export``.

An export has a dynamic batch axis, input ``input`` (float32 NCHW, preprocessed) and output
``logits``, followed by ``unknown_score`` where the module scores how unfamiliar each image is
(``trust.unknown.ScoredClassifier``). ONNX Runtime is imported only inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit._io import atomic_write, cache_home, update_with_tensors

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
ONNX_METADATA_KEY = "transferkit"
ONNX_OPSET = 17
ONNX_CACHE_KEEP = 16
"""Exports kept in the cache folder, the most recently used first."""
EXPORT_REVISION = 2
"""Part of every export's digest: raised when the same module exports to another graph, so cached
exports made before are not reused (2: 'same' padding fixed before the export)."""


def create_session(model: str | os.PathLike[str] | bytes) -> Any:
    """An ONNX Runtime session on CPU of a file or the bytes of a model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def session_forward(session: Any) -> Callable[[np.ndarray], Any]:
    """The session as a function of a float32 NCHW batch: its one output, or a tuple of them."""
    name = session.get_inputs()[0].name
    if len(session.get_outputs()) == 1:
        return lambda batch: session.run(None, {name: batch})[0]
    return lambda batch: tuple(session.run(None, {name: batch}))


def export_onnx(module: nn.Module, input_size: tuple[int, ...], target: str | os.PathLike[str] | io.BytesIO) -> None:
    """``module`` as ONNX with a dynamic batch axis, input ``input`` and output ``logits`` (or the
    module's own ``output_names``). timm's 'same' padding is fixed for ``input_size`` first, on a
    copy: onnxslim folds the exporter's per-call padding arithmetic wrongly where a map's side is
    odd (EfficientNet-Lite0 at 240 px gave 7x7 maps for 8x8, Lite2 at 260 px 16x16 for 17x17)."""
    import copy

    import torch

    from transferkit.models.padding import fix_same_padding

    module = fix_same_padding(copy.deepcopy(module).eval(), input_size)
    outputs = list(getattr(module, "output_names", (ONNX_OUTPUT,)))
    exported = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(1, *input_size),),
            exported,
            input_names=[ONNX_INPUT],
            output_names=outputs,
            dynamic_axes={ONNX_INPUT: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    model = simplified(exported.getvalue(), input_size)
    if isinstance(target, io.BytesIO):
        target.write(model)
    else:
        Path(target).write_bytes(model)


def simplified(model: bytes, input_size: tuple[int, ...]) -> bytes:
    """``model`` simplified by onnxslim (Ultralytics' ONNX simplifier): its constant arithmetic
    folded, pads fused into convolutions. The exporter writes timm's 'same' padding as shape
    arithmetic and a Pad before each strided convolution, which ONNX Runtime runs at every call:
    EfficientNet-Lite0's feature pass took 1.65x as long, and static int8 padded in float between
    a dequantise and a quantise (benchmarks/RESULTS.md: "int8 against float", "Measurements behind
    defaults"). The simplified graph is kept only where it gives the exported one's outputs on a
    random batch: a graph tool that folds wrongly must cost speed, never answers."""
    import onnx
    import onnxslim

    try:
        slim = onnxslim.slim(onnx.load_from_string(model)).SerializeToString()
    except Exception as error:  # a graph onnxslim cannot take still runs as exported
        log.info("onnxslim could not simplify the export (%s); keeping it as exported", error)
        return model
    batch = np.random.default_rng(0).standard_normal((2, *input_size)).astype(np.float32)
    exported, simple = (create_session(graph).run(None, {ONNX_INPUT: batch}) for graph in (model, slim))
    if all(a.shape == b.shape and np.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(exported, simple)):
        return slim
    log.warning("onnxslim's simplified export gave other outputs than the export itself; keeping the export "
                "as it is (slower, the same answers)")
    return model


def onnx_cache_folder() -> Path:
    return cache_home() / "onnx"


def export_digest(module: nn.Module, input_size: tuple[int, ...]) -> str:
    """Names everything an export depends on: the module tree as printed (classes, layer
    settings), the source files of transferkit's own modules in it, the versions of torch and timm
    (their modules' code) and of onnxslim (the graph), every tensor of its state and the input size."""
    import inspect

    import onnxslim
    import timm
    import torch

    own_files = {sys.modules[type(m).__module__] for m in module.modules() if type(m).__module__.startswith("transferkit")}
    own_code = sorted(inspect.getsource(source) for source in own_files)
    described = [type(module).__qualname__, repr(module), *own_code, str(input_size), torch.__version__,
                 timm.__version__, onnxslim.__version__, str(ONNX_OPSET), str(EXPORT_REVISION)]
    digest = hashlib.sha256("|".join(described).encode())
    update_with_tensors(digest, module.state_dict().items())
    return digest.hexdigest()[:32]


def cached_session(module: nn.Module, input_size: tuple[int, ...]) -> Any | None:
    """An ONNX Runtime session of ``module``; None if ONNX cannot express it.

    The export, otherwise paid on every predict, evaluate and feature pass, is kept in the
    cache folder and reused while the module and its weights are the same.
    """
    try:
        path = onnx_cache_folder() / f"{export_digest(module, input_size)}.onnx"
        if path.is_file():
            try:
                session = create_session(str(path))
                os.utime(path)  # recently used: kept when older exports are pruned
                return session
            except Exception as error:  # a damaged cache file is only a cache miss
                log.info("cached export %s unusable (%s); exporting again", path, error)
        buffer = io.BytesIO()
        export_onnx(module, input_size, buffer)
        _store_export(path, buffer.getvalue())
        return create_session(buffer.getvalue())
    except Exception as error:  # an architecture ONNX cannot express: eager still works
        log.info("ONNX export of %s failed (%s); using eager PyTorch", type(module).__name__, error)
        return None


def _store_export(path: Path, model: bytes) -> None:
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(model))
        exports = sorted(path.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in exports[ONNX_CACHE_KEEP:]:
            stale.unlink(missing_ok=True)
    except OSError as error:  # a read-only or full cache folder costs time, never the result
        log.info("could not keep the ONNX export in %s (%s)", path.parent, error)
