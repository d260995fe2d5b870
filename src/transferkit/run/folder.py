"""The run folder: one owner of every file name in it, its state, and its files read and written as typed records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit._io import read_csv_rows, read_json, write_csv_rows, write_json, write_text
from transferkit.config import TrainConfig
from transferkit.errors import DataError, RunFolderError
from transferkit.run.lock import LOCK_FILE, training_process
from transferkit.run.records import (
    HISTORY_COLUMNS,
    DamagedRecord,
    EpochRecord,
    OtherFormat,
    PhaseRecord,
    RunMetrics,
    config_from_yaml,
    config_yaml,
    default_split,
    phases_from_dict,
)
from transferkit.run.writing import (
    prepare_folder,  # noqa: F401 - train imports it from here
    refuse_links_out,
    writable_inside,
)

if TYPE_CHECKING:
    from transferkit.data.index import DatasetIndex


def run_split_items(run_dir: Path, split: str | None, classes: list[str]) -> tuple[str, list[tuple[str, int]]]:
    """(split, its items) from the run's split; ``split`` None means the default one."""
    splits = RunFolder(run_dir).read_splits(classes)
    split = split or default_split(splits)
    if split not in splits:
        raise DataError(
            f"run {run_dir} has no {split} split (it has {', '.join(splits)}); choose one of those"
        )
    return split, splits[split]


MODEL_CONFIG = "config.json"
"""What makes a folder a model folder: timm's local-dir config beside the weights."""


def is_exported_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file ``transferkit export`` writes (any format, by its name)."""
    from transferkit.export.formats import format_of_file

    return format_of_file(path) is not None


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a saved model folder (a run's ``model/``)."""
    return (Path(path) / MODEL_CONFIG).is_file()


def model_folder(path: str | os.PathLike[str]) -> Path:
    """The model folder of a run folder; any other path as given (a model folder already). A run
    folder without its model yet is one line saying why and what to do."""
    folder = RunFolder.containing(path)
    if folder.has_model():
        return folder.model_dir
    if folder.is_run():
        raise RunFolderError(folder.why_no_model())
    return folder.root


def evaluation_files(folder: Path) -> tuple[Path, Path]:
    """(metrics.json, predictions.csv) of one evaluation, in a run or wherever ``--output`` put it."""
    return folder / "metrics.json", folder / "predictions.csv"


class _File:
    """A path inside the run folder, as an attribute: ``folder.metrics_file``."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, folder: RunFolder, owner: type | None = None) -> Path:
        return folder.root / self.name


class RunFolder:
    """A run folder: its paths, what state it is in, and its files as typed records."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    @classmethod
    def containing(cls, path: str | os.PathLike[str]) -> RunFolder:
        """The run folder of ``path``, which names a run folder or its ``model/`` folder."""
        path = Path(path)
        if path.name == "model" and cls(path.parent).splits_file.is_file():
            return cls(path.parent)
        return cls(path)

    config_file = _File("config.yaml")
    """The resolved TrainConfig, with the format version."""
    classes_file = _File("classes.json")
    """Class names in label order."""
    splits_file = _File("splits.csv")
    """Every image with its split and label, by absolute path."""
    skipped_file = _File("skipped.csv")
    """Files that were not used, with the reason."""
    duplicates_file = _File("duplicates.csv")
    """Groups of byte-identical images."""
    leaks_file = _File("leaks.csv")
    """Near-copies of training images in val or test, the most similar first (empty when none)."""
    history_file = _File("history.csv")
    """One EpochRecord per epoch of each phase."""
    progress_file = _File("progress.json")
    """Each finished phase's PhaseRecord; what ``--resume`` reads."""
    metrics_file = _File("metrics.json")
    """The finished run's RunMetrics."""
    checkpoints_dir = _File("checkpoints")
    """``<phase>-best.ckpt`` and ``<phase>-last.ckpt`` (see ``checkpoint``)."""
    model_dir = _File("model")
    """The saved classifier in timm's local-dir layout."""
    figures_dir = _File("figures")
    """The report's figures: charts as PNG, grids of photos as JPEG."""
    report_file = _File("report.html")
    audit_dir = _File("audit")
    """What ``train --audit`` writes: audit.csv, audit.json, scores.csv and audit.html of the run's images."""
    logs_dir = _File("logs")  # what --logger writes: csv/, tensorboard/, mlflow.db, run-ids.json
    export_dir = _File("export")
    """What ``transferkit export`` writes by default (see ``export_file``)."""

    def evaluation_dir(self, name: str) -> Path:
        """One evaluation's metrics and predictions (see ``evaluation_files``)."""
        return self.root / "evaluation" / name

    @staticmethod
    def checkpoint_stem(phase: str, kind: str) -> str:
        """``<phase>-best`` or ``<phase>-last``: the name Lightning's ModelCheckpoint is given."""
        return f"{phase}-{kind}"

    def checkpoint(self, phase: str, kind: str) -> Path:
        return self.checkpoints_dir / f"{self.checkpoint_stem(phase, kind)}.ckpt"

    def export_file(self, format: str, quantize: str | None = None) -> Path:
        """Where ``transferkit export`` writes by default."""
        from transferkit.export.formats import FORMATS

        return self.export_dir / FORMATS[format].default_file(quantize)

    # writing
    def writable(self, path: Path) -> Path:
        """``path`` (inside this folder), once sure that writing it stays inside (``writing.writable_inside``)."""
        return writable_inside(self.root, path)

    def refuse_links_out(self) -> None:
        """Refuse a folder where a file or folder this run writes is a link leading out of it."""
        names = [attribute.name for attribute in vars(RunFolder).values() if isinstance(attribute, _File)]
        refuse_links_out(self.root, [*names, LOCK_FILE])

    # state
    def is_run(self) -> bool:
        """Whether a train has started here (its config is written once data and model are usable)."""
        return self.config_file.is_file()

    def is_finished(self) -> bool:
        return self.metrics_file.is_file()

    def has_model(self) -> bool:
        return is_model_folder(self.model_dir)

    def why_no_model(self) -> str:
        """Why this folder has no model, and what to do, in one line."""
        holder = training_process(self.root)
        if holder is not None:
            return (f"{self.root} is still training (pid {holder}): its model is written when the run finishes; "
                    "wait for it, or use another run")
        if self.is_run():
            return (f"{self.root} has no model: its train stopped before finishing; "
                    f"finish it with: transferkit train --resume {self.root}")
        return f"{self.root} is not a finished run folder: {self.model_dir} is missing"

    def has_evaluation(self, name: str) -> bool:
        return evaluation_files(self.evaluation_dir(name))[0].is_file()

    def holds_work(self) -> bool:
        """Whether a train here got as far as training (a checkpoint or a result); a folder with only
        the files written at the start (config, splits) holds a start that failed before any work
        and may be reused."""
        results = (self.progress_file, self.metrics_file, self.history_file)
        return any(path.is_file() for path in results) or any(self.checkpoints_dir.glob("*.ckpt"))

    # config
    def write_config(self, source: str, config: TrainConfig) -> None:
        write_text(self.config_file, config_yaml(source, config))

    def config_text(self) -> str:
        return self.config_file.read_text(encoding="utf-8")

    def read_config(self) -> TrainConfig:
        """The run's TrainConfig, with ``output`` set to this folder; a damaged file is one line."""
        return self.read_record()[1]

    def read_record(self) -> tuple[str, TrainConfig]:
        """The data source the run was trained on and its TrainConfig (``output`` set to this folder)."""
        path = self.config_file
        if not path.is_file():
            raise RunFolderError(f"{self.root} is not a run folder: {path} is missing")
        try:
            source, config = config_from_yaml(path.read_bytes())
        except OtherFormat as error:
            raise RunFolderError(f"{path} has {error}; train again with this version") from None
        except DamagedRecord as error:
            raise RunFolderError(f"{path} is damaged ({error}); restore it, or train again into a new --output") from None
        config.output = str(self.root)
        return source, config

    # index
    def write_index(self, index: DatasetIndex) -> None:
        index.write_splits(self.splits_file)
        index.write_skipped(self.skipped_file)
        index.write_duplicates(self.duplicates_file)
        write_json(self.classes_file, index.classes)

    def has_index(self) -> bool:
        return self.splits_file.is_file()

    def read_index(self, root: Path) -> DatasetIndex:
        """The split this run wrote: the same images, classes, skipped files and duplicates."""
        from transferkit.data.index import DatasetIndex

        needed = (self.splits_file, self.classes_file, self.skipped_file)
        missing = [path.name for path in needed if not path.is_file()]
        if missing:
            raise RunFolderError(
                f"{self.root} has no {', '.join(missing)}; "
                "--splits-from needs the folder of a run that got past its data scan"
            )
        index = DatasetIndex.read_splits(root, self.classes(), self.splits_file)
        index.skipped = self.skipped()
        index.read_duplicates(self.duplicates_file)
        return index

    def classes(self) -> list[str]:
        return read_json(self.classes_file)

    def read_splits(self, classes: list[str]) -> dict[str, list[tuple[str, int]]]:
        """Each split's (path, label) items, in the order the run wrote them."""
        from transferkit.data.index import DatasetIndex

        if not self.splits_file.is_file():
            raise RunFolderError(f"{self.root} is not a finished run folder: {self.splits_file} is missing")
        return DatasetIndex.read_splits(self.root, classes, self.splits_file).splits

    def skipped(self) -> list[tuple[str, str]]:
        return [(row["path"], row["reason"]) for row in read_csv_rows(self.skipped_file)]

    # history
    def read_history(self) -> list[EpochRecord]:
        return [EpochRecord.from_row(row) for row in read_csv_rows(self.history_file)]

    def write_epoch(self, record: EpochRecord) -> None:
        """Add an epoch's row; a resumed epoch replaces its row rather than duplicating it."""
        rows = [r.as_row() for r in self.read_history() if (r.phase, r.epoch) != (record.phase, record.epoch)]
        write_csv_rows(self.history_file, HISTORY_COLUMNS, rows + [record.as_row()])

    # progress and metrics
    def read_progress(self) -> dict[str, PhaseRecord]:
        """Each phase's record so far, in training order; none before the first phase ends."""
        if not self.progress_file.is_file():
            return {}
        return phases_from_dict(read_json(self.progress_file)["phases"])

    def write_progress(self, phases: dict[str, PhaseRecord]) -> None:
        write_json(self.progress_file, {"phases": {name: phase.to_dict() for name, phase in phases.items()}})

    def read_metrics(self) -> RunMetrics | None:
        """The finished run's metrics; None while it has not finished."""
        return RunMetrics.from_dict(read_json(self.metrics_file)) if self.metrics_file.is_file() else None

    def write_metrics(self, metrics: RunMetrics) -> None:
        write_json(self.metrics_file, metrics.to_dict())

    def read_evaluation(self, name: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """(metrics, one prediction row per image) of the evaluation ``name``."""
        metrics_file, predictions_file = evaluation_files(self.evaluation_dir(name))
        return read_json(metrics_file), read_csv_rows(predictions_file)


def load_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The TrainConfig a run was trained with, read from its folder."""
    return RunFolder(run_dir).read_config()


def holds_work(run_dir: Path) -> bool:
    """Whether an earlier train in ``run_dir`` got as far as training (a checkpoint or a result)."""
    return RunFolder(run_dir).holds_work()
