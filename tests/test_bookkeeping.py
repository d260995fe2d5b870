"""A phase's bookkeeping, shared by the head loop and Lightning's History callback: it stops and
picks the best epoch exactly as Lightning's EarlyStopping and ModelCheckpoint would, writes
history.csv, and resumes a phase whose checkpoint an earlier transferkit wrote."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from transferkit.run.folder import RunFolder
from transferkit.run.records import EpochRecord, legacy_phase_state
from transferkit.training.bookkeeping import PhaseBookkeeping

LOSSES = {
    "improving": [0.9, 0.7, 0.5, 0.4],
    "plateau": [0.5, 0.4, 0.45, 0.41, 0.42, 0.3],
    "late best": [0.5, 0.6, 0.4, 0.45, 0.46, 0.47],
    "tie is no improvement": [0.5, 0.5, 0.5, 0.4],
    "nan later": [0.5, 0.4, math.nan, 0.3],
    "nan first": [math.nan, 0.4],
}


def feed(bookkeeping: PhaseBookkeeping, losses: list[float]) -> list[int]:
    """The epochs (1-based) the bookkeeping saw before it stopped."""
    seen = []
    for loss in losses:
        seen.append(bookkeeping.epochs_done + 1)
        if bookkeeping.end_epoch(train_loss=1.0, train_acc=0.5, val_loss=loss, val_acc=1 - loss, lr=1e-3, seconds=0.1):
            break
    return seen


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("patience", [1, 2])
def test_it_stops_where_lightning_early_stopping_stops(tmp_path: Path, name: str, patience: int) -> None:
    losses = LOSSES[name]
    lightning = EarlyStopping(monitor="val_loss", mode="min", patience=patience)
    expected = []
    for epoch, loss in enumerate(losses, start=1):
        expected.append(epoch)
        if lightning._evaluate_stopping_criteria(torch.tensor(loss))[0]:
            break
    bookkeeping = PhaseBookkeeping(RunFolder(tmp_path), "frozen", len(losses), patience)
    assert feed(bookkeeping, losses) == expected


def test_the_record_names_the_best_epoch_and_history_holds_every_epoch(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    bookkeeping = PhaseBookkeeping(folder, "finetune", 10, patience=2)
    assert feed(bookkeeping, [0.5, 0.4123456789, 0.45, 0.413]) == [1, 2, 3, 4]
    record = bookkeeping.phase_record("checkpoints/finetune-best.ckpt", (10, 100), 1.23456, trained_blocks=3)
    assert (record.best_epoch, record.best_val_loss, record.epochs, record.diverged) == (2, 0.412346, 4, False)
    assert (record.trainable_parameters, record.total_parameters, record.trained_blocks, record.fit_seconds) == (
        10, 100, 3, 1.235)
    rows = folder.read_history()
    assert [(r.phase, r.epoch, r.val_loss) for r in rows] == [
        ("finetune", 1, 0.5), ("finetune", 2, 0.412346), ("finetune", 3, 0.45), ("finetune", 4, 0.413)]


def test_a_non_finite_first_epoch_leaves_a_diverged_phase_without_a_best_epoch(tmp_path: Path) -> None:
    bookkeeping = PhaseBookkeeping(RunFolder(tmp_path), "frozen", 5, patience=5)
    assert feed(bookkeeping, [math.nan, 0.4]) == [1]
    record = bookkeeping.phase_record("checkpoints/frozen-best.ckpt", (1, 2), 0.0)
    assert record.diverged and record.best_epoch is None and record.best_val_loss is None and record.epochs == 1


def test_only_a_writing_process_adds_history_rows(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    feed(PhaseBookkeeping(folder, "frozen", 3, patience=3, write=False), [0.5, 0.4, 0.3])
    assert folder.read_history() == []


@pytest.mark.parametrize("source", ["history state", "history.csv"])
def test_a_phase_an_earlier_transferkit_checkpointed_resumes_with_its_best_epoch_and_patience(
    tmp_path: Path, source: str
) -> None:
    rows = [EpochRecord("finetune", epoch, val_loss=loss, val_acc=0.9) for epoch, loss in [(1, 0.5), (2, 0.4), (3, 0.45)]]
    # Epoch 4's row was written before the kill; its checkpoint was not.
    rows.append(EpochRecord("finetune", 4, val_loss=0.3, val_acc=0.95))
    saved = {"epochs": 3, "best": rows[1].as_row()} if source == "history state" else None
    bookkeeping = PhaseBookkeeping(RunFolder(tmp_path), "finetune", 10, patience=2)
    bookkeeping.load_state_dict(legacy_phase_state(saved, rows, epochs_done=3))
    assert (bookkeeping.epochs_done, bookkeeping.best_epoch, bookkeeping.best_val_loss) == (3, 2, 0.4)
    assert feed(bookkeeping, [0.42, 0.39]) == [4], "one more epoch without a lower loss ends patience 2"


class Lines(logging.Handler):
    """The console's epoch lines, as a person reading it would get them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def epoch_lines() -> Iterator[list[str]]:
    handler, logger = Lines(), logging.getLogger("transferkit.epochs")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_quick_epochs_show_every_few_and_say_where_patience_stopped_the_phase(
    tmp_path: Path, epoch_lines: list[str]
) -> None:
    bookkeeping = PhaseBookkeeping(RunFolder(tmp_path), "frozen", epochs=30, patience=5)
    losses = [1.0 - 0.05 * epoch for epoch in range(14)] + [0.9] * 10  # best at epoch 14, stopped at 19
    assert feed(bookkeeping, losses)[-1] == 19
    assert len(RunFolder(tmp_path).read_history()) == 19, "history.csv keeps every epoch"
    assert [line.split()[1] for line in epoch_lines[:-1]] == ["1/30", "5/30", "10/30", "15/30", "19/30"]
    assert epoch_lines[-1] == "frozen   stopped early: no better validation loss for 5 epochs (best epoch 14)"
    # Columns line up across phases and epoch counts: 'val loss' starts at the same place on every line.
    assert len({line.index("val loss") for line in epoch_lines[:-1]}) == 1


def test_slow_or_few_epochs_each_get_a_line_and_a_phase_that_ran_out_says_nothing_more(
    tmp_path: Path, epoch_lines: list[str]
) -> None:
    few = PhaseBookkeeping(RunFolder(tmp_path), "finetune", epochs=4, patience=4)
    feed(few, [0.5, 0.4, 0.3, 0.2])
    slow = PhaseBookkeeping(RunFolder(tmp_path), "frozen", epochs=30, patience=30)
    for epoch in range(3):
        slow.end_epoch(train_loss=1.0, train_acc=0.5, val_loss=0.5 - epoch / 10, val_acc=0.5, lr=1e-3, seconds=2.5)
    assert [line.split()[:2] for line in epoch_lines] == [
        ["finetune", "1/4"], ["finetune", "2/4"], ["finetune", "3/4"], ["finetune", "4/4"],
        ["frozen", "1/30"], ["frozen", "2/30"], ["frozen", "3/30"]]
    assert epoch_lines[0].index("val loss") == epoch_lines[-1].index("val loss")
