"""``transferkit predict``: labels, probabilities and the unknown answer for image files."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import not_regular_reason
from transferkit.data.folders import list_image_files
from transferkit.data.images import image_extensions
from transferkit.inference.loading import load_predictor
from transferkit.inference.predictor import Predictor
from transferkit.trust.records import UNKNOWN


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]
    unknown_score: float | None = None
    """How unlike the training images the image is (higher is less alike); None without a score."""
    unknown: bool = False
    """Whether the score is above the model's threshold, with rejection on."""

    @property
    def answer(self) -> str:
        """The top label, or ``unknown``."""
        return UNKNOWN if self.unknown else self.labels[0]


@dataclass
class PredictionResult:
    """Every image's prediction, in the order given, and the files that could not be read."""

    predictions: list[Prediction]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, index: int) -> Prediction:
        return self.predictions[index]

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.predictions)

    def __repr__(self) -> str:
        answers = Counter(prediction.answer for prediction in self.predictions)
        shown = ", ".join(f"{answer} {count}" for answer, count in answers.most_common(5))
        return f"PredictionResult({len(self)} images: {shown}; {len(self.skipped)} skipped)"

    def to_pandas(self) -> Any:
        """One row per image: path, answer, unknown score and whether it is unknown, then each
        label with its probability, most likely first (the columns of ``predict --format csv``)."""
        import pandas as pd

        rows = []
        for prediction in self.predictions:
            row: dict[str, Any] = {"path": prediction.path, "answer": prediction.answer,
                                   "unknown_score": prediction.unknown_score, "unknown": prediction.unknown}
            for rank, (label, probability) in enumerate(zip(prediction.labels, prediction.probabilities), 1):
                row[f"label_{rank}"], row[f"probability_{rank}"] = label, probability
            rows.append(row)
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        """Jupyter's view: the first images' answers and top probabilities."""
        from transferkit._notebook import rows_table, view

        rows = [[Path(p.path).name, p.answer, f"{p.probabilities[0]:.1%}"] for p in self.predictions]
        return view(f"Predictions for {len(self)} images", rows_table(["image", "answer", "top probability"], rows),
                    f"<p>{len(self.skipped)} files skipped</p>")


def collect_images(inputs: list[str | os.PathLike[str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files named directly or found below the folders, in order; missing paths are skipped."""
    extensions = image_extensions()
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found, ignored = list_image_files(path, extensions)
            if not found:
                skipped.append((str(path), "folder holds no image files"))
            files += sorted(found)
            skipped += ignored
        elif reason := not_regular_reason(path):  # a FIFO would hang the decoder, /dev/zero never ends
            skipped.append((str(path), reason))
        elif path.is_file() or path.is_symlink():  # a broken or looping link gets its reason from the decoder
            files.append(str(path))
        else:
            skipped.append((str(path), "no such file or folder"))
    return files, skipped


def predict(
    run: str | os.PathLike[str] | Predictor,
    inputs: list[str | os.PathLike[str]],
    top_k: int = 5,
    batch_size: int = 64,
    num_workers: int | None = None,
    tta: bool = False,
    progress: bool = False,
    reject: bool = True,
) -> PredictionResult:
    """Top-k labels and (calibrated) probabilities for every image in ``inputs`` (files or
    folders), with the unknown score where the model has one; with ``reject``, an image scored
    above the model's threshold is answered ``unknown``.

    Files that are not readable images are listed in ``skipped``, never fatal.
    """
    classifier = run if isinstance(run, Predictor) else load_predictor(run)
    files, skipped = collect_images(inputs)
    unreadable: dict[str, str] = {}
    probabilities, scores = classifier.scored(
        files, batch_size=batch_size, num_workers=num_workers, tta=tta, progress=progress, unreadable=unreadable
    )
    skipped += sorted(unreadable.items())
    files = [path for path in files if path not in unreadable]
    k = max(1, min(top_k, len(classifier.classes)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    threshold = classifier.unknown["threshold"] if reject and classifier.unknown and scores is not None else None
    predictions = [
        Prediction(
            path, [classifier.classes[i] for i in row], [float(probabilities[n, i]) for i in row],
            unknown_score=None if scores is None else float(scores[n]),
            unknown=threshold is not None and float(scores[n]) > threshold,  # type: ignore[index]
        )
        for n, (path, row) in enumerate(zip(files, order))
    ]
    return PredictionResult(predictions, skipped)
