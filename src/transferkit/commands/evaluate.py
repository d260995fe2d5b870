"""``transferkit evaluate``: a trained model judged on a labelled split or folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transferkit.data.folders import read_labelled_folder, split_folders
from transferkit.errors import DataError
from transferkit.inference.loading import load_predictor
from transferkit.inference.metrics import Evaluation, evaluation_from_probabilities
from transferkit.run.folder import RunFolder, is_model_folder, is_exported_file, run_split_items
from transferkit.trust.temperature import before_and_after, uncalibrated_probabilities

log = logging.getLogger(__name__)


def evaluate(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    split: str | None = None,
    output: str | os.PathLike[str] | None = None,
    tta: bool = False,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """Evaluate a run's model on one of its own splits or on any labelled image folder.

    ``data`` is a folder of ``<class>/<image>`` whose class names are the run's (a subset is
    fine); a folder holding train/val/test folders is read at ``split`` (default test).
    Without ``data``, the run's own ``split`` is used (default: test, else val). The metrics
    and one row per image are written to ``output`` (default ``RUN/evaluation/<name>``).
    ``run`` may also be a run's model folder (judged on the run's splits) or a file ``transferkit export``
    wrote, or a model folder on its own, which then need ``data``.
    """
    run_dir = Path(run)
    # An exported file keeps its evaluations beside it, as a run keeps them in its folder.
    home = RunFolder(run_dir.parent) if is_exported_file(run_dir) else RunFolder.containing(run_dir)
    classifier = load_predictor(run_dir)
    name, items, skipped = _labelled_items(run_dir, home.root, data, split, classifier.classes)
    unreadable: dict[str, str] = {}
    probabilities, scores = classifier.scored(
        [path for path, _ in items], batch_size=batch_size, num_workers=num_workers, tta=tta, progress=progress,
        unreadable=unreadable,
    )
    skipped += sorted(unreadable.items())
    items = [item for item in items if item[0] not in unreadable]
    if not items:
        raise DataError(f"no readable images in {data or run_dir}; expected <class>/<image>.jpg folders")
    if skipped:
        log.warning("skipped %d files that are not readable images", len(skipped))
    evaluation = evaluation_from_probabilities(name, classifier.classes, items, probabilities)
    evaluation.skipped = skipped
    evaluation.metrics["tta"] = tta
    calibration = classifier.info.get("calibration")
    if calibration and not tta:  # a mirror-averaged probability has no single logit to undo T from
        evaluation.metrics["calibration"] = before_and_after(
            uncalibrated_probabilities(probabilities, classifier.temperature), evaluation.targets,
            classifier.temperature, calibration["fitted_on"],
        )
    if scores is not None and classifier.unknown:
        evaluation.judge_unknown(scores, classifier.unknown)
    evaluation.write(Path(output) if output else home.writable(home.evaluation_dir(name + ("-tta" if tta else ""))))
    return evaluation


def _labelled_items(
    run_dir: Path, home: Path, data: str | os.PathLike[str] | None, split: str | None, classes: list[str],
) -> tuple[str, list[tuple[str, int]], list[tuple[str, str]]]:
    """(the evaluation's name, its (path, label) items, the files skipped): the run's own split
    without ``data``, else the labelled folder ``data`` (its ``split`` folder where one is named)."""
    if data is None:
        if is_exported_file(run_dir) or (is_model_folder(run_dir) and home == run_dir):
            raise DataError(f"{run_dir} is a model without its run's splits; give a labelled folder DATA to evaluate "
                            f"on: transferkit evaluate {run_dir} DATA")
        split, items = run_split_items(home, split, classes)
        return split, items, []
    root = Path(data)
    if split is not None:
        folders = split_folders(root) if root.is_dir() else {}
        if split not in folders:
            raise DataError(f"{root} has no {split} folder; point at a folder of class folders or drop --split")
        root = folders[split]
    items, skipped = read_labelled_folder(root, classes)
    return root.name, items, skipped
