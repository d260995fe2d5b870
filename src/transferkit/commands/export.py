"""``transferkit export``: a trained run as a file for another runtime, checked against the model it came from."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import ConfigError, RunFolderError
from transferkit.export.onnx import write_onnx
from transferkit.export.torchscript import load_torchscript, write_torchscript
from transferkit.inference.loading import load_onnx_predictor, load_run_model, predictor_metadata
from transferkit.inference.predictor import Predictor
from transferkit.run.folder import RunFolder

log = logging.getLogger(__name__)


FORMATS = ("onnx", "torchscript")


QUANTIZATIONS = ("int8",)


@dataclass
class ExportResult:
    path: Path
    format: str
    quantize: str | None
    size_bytes: int
    images: int
    """Validation images the export was checked on."""
    max_abs_diff: float
    """Largest difference of any class probability between the export and the eager model."""
    accuracy: float
    reference_accuracy: float
    """The eager float model's accuracy on the same images."""
    max_score_diff: float | None = None
    """Largest difference of the unknown score, where the model has one."""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def _check_options(format: str, quantize: str | None) -> None:
    problems = []
    if format not in FORMATS:
        problems.append(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        problems.append(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if quantize is not None and format != "onnx":
        problems.append("--quantize int8 works on ONNX only; use --format onnx")
    if problems:
        raise ConfigError(problems)


def _check_output(path: Path) -> None:
    """Make the folder ``path`` goes in, or say in one line, before any work, why it cannot be written."""
    fix = "choose an --output in a writable folder"
    if path.is_dir():
        raise ConfigError([f"--output {path} is a folder; name the file to write, such as {path / 'model.onnx'}"])
    blocking = next((parent for parent in path.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError([f"--output {path}: {blocking} is a file, not a folder; {fix}"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # An unnamed file, gone when closed: a folder that lists but refuses new files fails here.
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as error:
        raise ConfigError([f"--output {path} cannot be written ({error.strerror or error}); {fix}"]) from None


def output_notes(predictor: Predictor) -> dict[str, str]:
    """What each output of the exported graph means, for a user with the file alone."""
    notes = {"logits": "softmax gives the class probabilities"}
    if predictor.info.get("calibration"):
        notes["logits"] += "; already divided by calibration.temperature (calibrated)"
    if predictor.unknown:
        notes["unknown_score"] = "higher is less like the training images; answer unknown above unknown.threshold"
    return notes


def export(
    run: str | os.PathLike[str],
    format: str = "onnx",
    quantize: str | None = None,
    output: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
) -> ExportResult:
    """Export a run's model and check the file against the eager model on the validation split.

    ONNX files have a dynamic batch axis, input ``input`` (float32 NCHW, preprocessed) and
    output ``logits`` (calibrated: the temperature is folded into the graph), then
    ``unknown_score`` where the model has one; the class names, preprocessing, ``calibration``
    and ``unknown`` (score and threshold) records are in the metadata property
    ``transferkit`` (JSON), so ``load_predictor`` and ``transferkit predict`` use the file
    alone. The default output is ``RUN/export/model[.int8].onnx`` or
    ``RUN/export/model.torchscript.pt``.
    """
    from transferkit.run.folder import run_split_items

    _check_options(format, quantize)
    folder = RunFolder.containing(run)
    run_dir = folder.root
    if not folder.has_model():
        raise RunFolderError(folder.why_no_model())
    # The default goes in the run folder, never through a link out of it; an --output is the user's to name.
    path = Path(output) if output else folder.writable(folder.export_file(format, quantize))
    _check_output(path)
    model, reference = load_run_model(run_dir)
    _, items = run_split_items(run_dir, "val", reference.classes)
    paths = [path for path, _ in items]
    targets = np.array([label for _, label in items])

    metadata = {**predictor_metadata(reference), "format": format + (f"-{quantize}" if quantize else ""),
                "outputs": output_notes(reference)}
    if format == "onnx":
        write_onnx(reference.module, metadata, path, quantize)
        exported = load_onnx_predictor(path)
    else:
        write_torchscript(reference.module, metadata, path)
        exported = load_torchscript(path)

    options = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    expected, expected_scores = reference.scored(paths, **options)
    actual, actual_scores = exported.scored(paths, **options)
    result = ExportResult(
        path=path,
        format=format,
        quantize=quantize,
        size_bytes=path.stat().st_size,
        images=len(paths),
        max_abs_diff=float(np.abs(actual - expected).max()) if len(paths) else 0.0,
        accuracy=float((actual.argmax(axis=1) == targets).mean()) if len(paths) else float("nan"),
        reference_accuracy=float((expected.argmax(axis=1) == targets).mean()) if len(paths) else float("nan"),
        max_score_diff=(float(np.abs(actual_scores - expected_scores).max())
                        if expected_scores is not None and actual_scores is not None and len(paths) else None),
    )
    log.debug("exported %s: max |difference| %.2e on %d images", path, result.max_abs_diff, result.images)
    return result
