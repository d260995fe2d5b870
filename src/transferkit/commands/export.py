"""``transferkit export``: a trained run as a file for another runtime, checked against the model it came from."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import ConfigError, RunFolderError, TransferkitError
from transferkit.export.formats import ALL_CHOICES, FORMATS, QUANTIZATIONS, Format, check_choice
from transferkit.export.parity import (
    ExportCheckError,
    Parity,
    check_accuracy,
    check_temperature,
    compare,
    moved_warning,
    refit_unknown,
)
from transferkit.inference.loading import load_run_model, predictor_metadata
from transferkit.inference.predictor import Predictor, preprocessed_batches
from transferkit.run.folder import RunFolder, run_split_items

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "QUANTIZATIONS", "ExportCheckError", "ExportResult", "export", "export_all", "export_table"]

CALIBRATION_IMAGES = 300
"""Training images whose activations set int8's ranges: a few hundred cover them (ONNX Runtime's
and NNCF's own examples use 100 to 300); more only costs time."""

MAX_ACCURACY_DROP = 1.0
"""Points of validation accuracy an exported file may lose against its model before it is refused."""


@dataclass(kw_only=True)
class ExportResult(Parity):
    """The file written and its parity record (``export.parity.Parity``) against the eager model."""

    path: Path
    format: str
    quantize: str | None
    size_bytes: int
    """The file's size, with OpenVINO's weights file beside it."""

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "path": str(self.path)}

    @property
    def name(self) -> str:
        return self.format + (f" {self.quantize}" if self.quantize else "")


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


QUANTIZATION_NOTES = {
    "int8": "static int8 on {images} training images (MinMax ranges; ONNX Runtime: QDQ, weights int8 per channel, "
            "activations uint8; OpenVINO: NNCF); head and unknown score in float",
    "int8-dynamic": "dynamic int8 weights (ONNX Runtime quantize_dynamic)",
}


class _Reference:
    """The run's model and what every export of it is checked against, computed once."""

    def __init__(self, run_dir: Path, batch_size: int, num_workers: int | None, progress: bool):
        import copy

        import torch

        from transferkit.models.padding import fix_same_padding

        _, self.predictor = load_run_model(run_dir)
        # Eager inference keeps the weights channels-last; exporters (XNNPACK's layout pass) expect them as stored.
        self.module = copy.deepcopy(self.predictor.module).eval().to(memory_format=torch.contiguous_format)
        fix_same_padding(self.module, tuple(self.predictor.preprocessing["input_size"]))
        self.run_dir = run_dir
        self.options = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
        _, items = run_split_items(run_dir, "val", self.predictor.classes)
        self.paths = [path for path, _ in items]
        self.targets = np.array([label for _, label in items])
        self.expected, self.expected_scores = self.predictor.scored(self.paths, **self.options)
        self.fit_rows = self._fit_rows()
        self._calibration: list[np.ndarray] | None = None

    def _fit_rows(self) -> np.ndarray:
        """The validation rows the model's unknown threshold was fitted on: those without a near-copy
        in train where the record counts that many (see ``training.evaluation``), else all of them."""
        from transferkit._io import read_csv_rows

        everything = np.arange(len(self.paths))
        record = self.predictor.unknown
        leaks_file = RunFolder(self.run_dir).leaks_file
        if not record or not leaks_file.is_file():
            return everything
        leaky = {row["path"] for row in read_csv_rows(leaks_file) if row.get("split") == "val"}
        rows = np.array([row for row, path in enumerate(self.paths) if path not in leaky], dtype=np.int64)
        return rows if len(rows) == record.get("images") else everything

    def calibration(self) -> list[np.ndarray]:
        """Preprocessed batches of up to ``CALIBRATION_IMAGES`` training images, a seeded sample."""
        if self._calibration is None:
            _, items = run_split_items(self.run_dir, "train", self.predictor.classes)
            rng = np.random.default_rng(0)
            chosen = sorted(rng.choice(len(items), min(CALIBRATION_IMAGES, len(items)), replace=False)) if items else []
            paths = [items[row][0] for row in chosen]
            self._calibration = list(preprocessed_batches(paths, self.predictor.preprocessing, 16, 2, unreadable={}))
        return self._calibration

    def metadata(self, chosen: Format, quantize: str | None) -> dict[str, Any]:
        metadata = {**predictor_metadata(self.predictor), "format": chosen.name + (f"-{quantize}" if quantize else ""),
                    "outputs": output_notes(self.predictor)}
        if quantize:
            images = sum(len(batch) for batch in self.calibration())
            metadata["quantization"] = QUANTIZATION_NOTES[quantize].format(images=images)
        return metadata

    def write_checked(self, chosen: Format, quantize: str | None, path: Path, max_accuracy_drop: float) -> ExportResult:
        """Write the file under a temporary name, run it in its own runtime on the validation split,
        refit its unknown threshold on its own scores, and move it to ``path`` only if it passes."""
        writer = chosen.module()
        metadata = self.metadata(chosen, quantize)
        work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            written = work / path.name
            writer.write(self.module, metadata, written, self.calibration() if quantize == "int8" else None, quantize)
            exported = writer.load(written)
            actual, actual_scores = exported.scored(self.paths, **self.options)
            del exported  # the runtime lets go of the file before its metadata is rewritten
            threshold = reference_threshold = None
            if self.predictor.unknown and actual_scores is not None:
                # A quantised file's scores move by more than the gap the model's threshold left, so it
                # gets its own; a float file's agree to about 1e-6 and keep the model's, so both answer alike.
                if quantize and len(self.paths):
                    metadata["unknown"] = refit_unknown(metadata["unknown"], actual_scores[self.fit_rows])
                    writer.write_metadata(written, metadata)
                threshold, reference_threshold = metadata["unknown"]["threshold"], self.predictor.unknown["threshold"]
            parity = compare(self.expected, self.expected_scores, actual, actual_scores, self.targets,
                             reference_threshold, threshold, self.predictor.temperature)
            what = f"the {chosen.name}{' ' + quantize if quantize else ''} export"
            check_accuracy(parity, max_accuracy_drop, what)
            check_temperature(parity, what, quantized=quantize is not None)
            warning = moved_warning(parity, what)
            if warning:
                log.warning("%s", warning)
            # The weights first: the model file, last, is what makes the pair look complete.
            for part, target in [*zip(chosen.sidecars(written), chosen.sidecars(path)), (written, path)]:
                os.replace(part, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return _result(path, chosen, quantize, parity)


def _result(path: Path, chosen: Format, quantize: str | None, parity: Parity) -> ExportResult:
    size = sum(part.stat().st_size for part in [path, *chosen.sidecars(path)] if part.is_file())
    return ExportResult(**vars(parity), path=path, format=chosen.name, quantize=quantize, size_bytes=size)


def _run_folder(run: str | os.PathLike[str]) -> RunFolder:
    folder = RunFolder.containing(run)
    if not folder.has_model():
        raise RunFolderError(folder.why_no_model())
    return folder


def export(
    run: str | os.PathLike[str],
    format: str = "onnx",
    quantize: str | None = None,
    output: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
) -> ExportResult:
    """Export a run's model and check the file in its own runtime against the eager model on the
    validation split; a file more than ``max_accuracy_drop`` points less accurate is not kept
    (``ExportCheckError``).

    Every file takes a float32 NCHW preprocessed batch (``input``) and gives ``logits``
    (calibrated: the temperature is in the graph), then ``unknown_score`` where the model has
    one, and carries a JSON record (``transferkit``) of the class names, preprocessing,
    ``calibration`` and ``unknown`` (score, and the threshold refitted on the file's own
    validation scores), so ``load_predictor``, ``transferkit predict``, ``evaluate`` and ``serve``
    use the file alone. The default output is ``RUN/export/`` and the format's file name
    (``model.onnx``, ``model.int8.onnx``, ``model.xml``, ``model.tflite``, ``model.pte``, ``model.pt2``).
    """
    chosen = check_choice(format, quantize)
    folder = _run_folder(run)
    # The default goes in the run folder, never through a link out of it; an --output is the user's to name.
    path = Path(output) if output else folder.writable(folder.export_file(format, quantize))
    _check_output(path)
    if not path.name.lower().endswith(chosen.suffix):
        raise ConfigError([f"--output {path}: a {format} file's name ends in {chosen.suffix}"])
    if chosen.deprecated:
        log.warning("%s", chosen.deprecated)
    reference = _Reference(folder.root, batch_size, num_workers, progress)
    result = reference.write_checked(chosen, quantize, path, max_accuracy_drop)
    log.debug("exported %s: max |difference| %.2e on %d images", path, result.max_abs_diff, result.images)
    return result


@dataclass
class ExportAll:
    results: list[ExportResult]
    failed: dict[str, str]
    """Format (and quantisation) name -> the one line of why it was not written."""
    missing: dict[str, str]
    """Format name -> the install command of a runtime not installed here."""


def export_all(
    run: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    choices: Sequence[tuple[str, str | None]] = ALL_CHOICES,
) -> ExportAll:
    """Every installed (format, quantisation) of ``choices`` (default ``formats.ALL_CHOICES``) into
    the folder ``output`` (default ``RUN/export``), each checked as ``export`` checks one, against
    one eager pass over the validation split; a format that fails is named, not fatal."""
    folder = _run_folder(run)
    target = Path(output) if output else folder.writable(folder.export_dir)
    if target.exists() and not target.is_dir():
        raise ConfigError([f"--output {target}: with --format all, name a folder"])
    _check_output(target / "model.onnx")
    reference = _Reference(folder.root, batch_size, num_workers, progress)
    outcome = ExportAll([], {}, {})
    for name, quantize in choices:
        chosen = FORMATS[name]
        label = name + (f" {quantize}" if quantize else "")
        if not chosen.installed(quantize):
            outcome.missing[label] = chosen.install
            continue
        try:
            outcome.results.append(reference.write_checked(chosen, quantize, target / chosen.default_file(quantize),
                                                           max_accuracy_drop))
        except TransferkitError as error:
            outcome.failed[label] = str(error)
        except Exception as error:  # a converter that cannot express this model: the other formats still ship
            outcome.failed[label] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return outcome


def export_table(results: list[ExportResult]) -> str:
    """One row per file: size and its agreement with the model, as ``--format all`` prints it."""
    lines = ["| format | file | size (MB) | max prob. diff | accuracy | change | unknown agreement |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        agreement = f"{result.unknown_agreement:.4f}" if result.unknown_agreement is not None else ""
        lines.append(f"| {result.name} | {result.path.name} | {result.size_bytes / 1e6:.2f} | {result.max_abs_diff:.1e} | "
                     f"{result.accuracy:.4f} | {result.accuracy_change:+.4f} | {agreement} |")
    return "\n".join(lines)
