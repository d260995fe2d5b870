"""A predictor from whatever a user points at: a run folder, a model folder or an exported file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.errors import RunFolderError
from transferkit.inference.onnx_runtime import ONNX_METADATA_KEY, create_session, session_forward
from transferkit.inference.predictor import (
    EXPORT_AGAIN,
    Forward,
    Predictor,
    create_forward,
    default_backend,
    torch_forward,
)
from transferkit.models.metadata import FieldError, check_classes, check_preprocessing, shown
from transferkit.run.folder import is_exported_file, model_folder
from transferkit.run.records import saved_preprocessing
from transferkit.trust.records import Rejection

if TYPE_CHECKING:
    from torch import nn


def predictor_metadata(predictor: Predictor) -> dict[str, Any]:
    """What an exported file carries so it can be used alone: class names, preprocessing, origin."""
    preprocessing = {k: list(v) if isinstance(v, tuple) else v for k, v in predictor.preprocessing.items()}
    origin = {k: v for k, v in predictor.info.items() if k != "source"}
    return {"classes": predictor.classes, "preprocessing": preprocessing, **origin}


def predictor_from_metadata(
    forward: Forward, metadata: Any, source: str, outputs: int | None = None,
    input_size: list[Any] | None = None,
) -> Predictor:
    """The inverse of ``predictor_metadata``, for a file loaded from ``source``, every value
    checked: ``outputs`` is the model's number of classes and ``input_size`` its input's shape
    (batch first; a name where an axis is dynamic), where the file says them."""
    from transferkit.trust.temperature import Calibration

    try:
        if not isinstance(metadata, dict):
            raise FieldError(f"{ONNX_METADATA_KEY} is {shown(metadata)}; it must be a JSON object")
        content = dict(metadata)
        classes = check_classes(content.pop("classes", None), outputs, "classes")
        preprocessing = check_preprocessing(content.pop("preprocessing", None), "preprocessing")
        fixed, size = list(input_size or [])[1:], list(preprocessing["input_size"])
        if len(fixed) == 3 and any(isinstance(side, int) and side != given for side, given in zip(fixed, size)):
            raise FieldError(f"preprocessing.input_size is {size}; it must be the model's input size, {fixed}")
        if content.get("calibration") is not None:
            content["calibration"] = Calibration.from_dict(content["calibration"]).as_dict()
        if content.get("unknown") is not None:
            content["unknown"] = Rejection.from_dict(content["unknown"]).as_dict()
    except FieldError as error:
        raise RunFolderError(f"{source}: {error}; {EXPORT_AGAIN}") from None
    return Predictor(forward, classes, preprocessing, {**content, "source": source})


def load_onnx_predictor(path: str | os.PathLike[str]) -> Predictor:
    """A Predictor from a ``.onnx`` file written by ``transferkit export``; needs no torch."""
    path = Path(path)
    try:
        session = create_session(path)
    except Exception as error:
        raise RunFolderError(f"{path} is not a readable ONNX model ({str(error).splitlines()[0]})") from None
    found = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    if not found:
        raise RunFolderError(
            f"{path} carries no class names or preprocessing; export it with `transferkit export RUN`"
        )
    try:
        metadata = json.loads(found)
    except json.JSONDecodeError as error:
        raise RunFolderError(
            f"{path}: its {ONNX_METADATA_KEY} metadata is not valid JSON ({error}); {EXPORT_AGAIN}"
        ) from None
    shape = session.get_outputs()[0].shape
    # A dynamic class axis is checked on each forward instead (Predictor.checked_logits).
    outputs = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
    return predictor_from_metadata(session_forward(session), metadata, str(path), outputs,
                                   session.get_inputs()[0].shape)


def load_run_model(path: str | os.PathLike[str]) -> tuple[nn.Module, Predictor]:
    """The torch model of a run folder (or its ``model/`` folder) in eval mode, with a
    Predictor that runs it eagerly on CPU with its temperature and unknown score."""
    from transferkit.models.folder import load_model, load_trust
    from transferkit.trust.unknown import scored_classifier

    folder = model_folder(path)
    model, config = load_model(folder)
    classes, preprocessing = saved_classes_and_preprocessing(model, config, folder)
    trust = load_trust(folder, config, width=model.num_features)
    scored = scored_classifier(model, trust)
    info = {"architecture": config["architecture"], **trust.as_dict(), "source": str(folder)}
    return model, Predictor(torch_forward(scored, "cpu"), classes, preprocessing, info, module=scored)


def saved_classes_and_preprocessing(
    model: nn.Module, config: dict[str, Any], folder: Path,
) -> tuple[list[str], dict[str, Any]]:
    """The class names and preprocessing a model ``folder``'s ``config.json`` names, checked against ``model``."""
    try:
        preprocessing = check_preprocessing(saved_preprocessing(config, model), "transferkit.preprocessing")
        names = config.get("label_names") or [str(i) for i in range(config["num_classes"])]
        classes = check_classes(names, config["num_classes"], "label_names")
    except FieldError as error:
        raise RunFolderError(
            f"{folder / 'config.json'}: {error}; fix it there or train the model again"
        ) from None
    return classes, preprocessing


def load_predictor(path: str | os.PathLike[str], device: str | None = None) -> Predictor:
    """A Predictor from a run folder, its ``model/`` folder, or an exported file (``.onnx``,
    OpenVINO ``.xml``, ``.tflite``, ``.pte``, ``.pt2``, ``.torchscript.pt``), which runs in its
    own runtime (ONNX Runtime, OpenVINO and LiteRT without torch)."""
    if is_exported_file(path):
        from transferkit.export.formats import load_exported

        return load_exported(path)  # type: ignore[return-value]  # each format's load gives a Predictor
    import torch

    _, predictor = load_run_model(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scored: nn.Module = predictor.module  # type: ignore[assignment]  # always set for a run folder
    predictor.forward = create_forward(scored, predictor.preprocessing["input_size"], default_backend(device))
    return predictor


load_classifier = load_predictor
"""An earlier name of ``load_predictor``, kept so that code written against it runs."""
