"""A phase's record of its epochs, kept the same way by the head loop and by Lightning's ``History``
callback: history.csv's rows and the console's lines, the best epoch, patience, the ``PhaseRecord``."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from transferkit._io import stops_held
from transferkit.run.folder import RunFolder
from transferkit.run.records import EpochRecord, PhaseRecord
from transferkit.training.loggers import log_epoch
from transferkit.training.phase import epoch_log, format_stop, format_time_limit_stop, record_epoch

SLOW_EPOCH_SECONDS = 1.0
"""Epochs at least this long each get a line; quicker ones (the head on cached features) every few."""
LINES_PER_PHASE = 6
"""About how many lines a phase of quick epochs shows on the console."""


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class PhaseBookkeeping:
    """Epochs done, the epoch with the lowest validation loss and early stopping, as Lightning's
    ModelCheckpoint and EarlyStopping judge them: the first epoch is always a best one, a later one
    is if its loss is lower, and a non-finite validation loss ends the phase. An epoch that would end
    past ``deadline`` (``time.perf_counter()``'s clock; ``--time-limit``), by the last one's length,
    is not started. Only a ``write`` process (rank zero) writes history rows, and sends them to the
    run's ``loggers`` (``--logger``)."""

    def __init__(self, folder: RunFolder, phase: str, epochs: int, patience: int, write: bool = True,
                 loggers: Sequence[Any] = (), deadline: float | None = None):
        self.folder = folder
        self.loggers = loggers
        self.phase = phase
        self.planned_epochs = epochs
        self.patience = patience
        self.write = write
        self.epochs_done = 0
        self.best_val_loss = math.inf
        self.best_val_acc = 0.0
        self.best_epoch = 0
        self.epochs_without_improvement = 0
        self.pending: EpochRecord | None = None
        self.stopping = False
        self.deadline = deadline
        self.time_limited = False

    def end_epoch(
        self, *, train_loss: float | None, train_acc: float | None, val_loss: float, val_acc: float, lr: float,
        seconds: float,
    ) -> bool:
        """Record an epoch and show it (its row in history.csv, its line on the console); whether
        the phase stops after it."""
        stop = self.record(train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                           lr=lr, seconds=seconds)
        self.publish()
        return stop

    def record(
        self, *, train_loss: float | None, train_acc: float | None, val_loss: float, val_acc: float, lr: float,
        seconds: float,
    ) -> bool:
        """Count an epoch without showing it yet, so that a loop can keep its state first: a stop
        after its line appears then always finds the epoch in the checkpoint."""
        self.epochs_done += 1
        self.pending = EpochRecord(
            phase=self.phase, epoch=self.epochs_done, train_loss=rounded(train_loss), train_acc=rounded(train_acc),
            val_loss=rounded(val_loss), val_acc=rounded(val_acc), lr=lr, seconds=round(seconds, 3),
        )
        if self.best_epoch == 0 or val_loss < self.best_val_loss:
            self.best_epoch, self.best_val_acc = self.epochs_done, val_acc
            self.best_val_loss = val_loss if math.isfinite(val_loss) else math.inf
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        self.stopping = not math.isfinite(val_loss) or self.epochs_without_improvement >= self.patience
        if (not self.stopping and self.deadline is not None and self.epochs_done < self.planned_epochs
                and time.perf_counter() + seconds > self.deadline):
            self.stopping = self.time_limited = True
        return self.stopping

    def publish(self) -> None:
        """The recorded epoch's history row, logger metrics and console line (rank zero only):
        every epoch's line where epochs are slow or few, else the first, every few, and the last,
        then why the phase stopped where patience ended it."""
        if self.write and self.pending is not None:
            last = self.stopping or self.epochs_done >= self.planned_epochs
            every = -(-self.planned_epochs // LINES_PER_PHASE)
            shown = (self.planned_epochs <= 2 * LINES_PER_PHASE or (self.pending.seconds or 0) >= SLOW_EPOCH_SECONDS
                     or self.epochs_done == 1 or self.epochs_done % every == 0 or last)
            with stops_held():  # the row and the loggers hold the same epochs
                record_epoch(self.folder, self.pending, self.planned_epochs, shown)
                log_epoch(self.loggers, self.pending)
            if self.time_limited:
                epoch_log.info(format_time_limit_stop(self.phase, self.epochs_done, self.planned_epochs, self.best_epoch))
            elif self.stopping and self.epochs_done < self.planned_epochs and math.isfinite(self.pending.val_loss or 0):
                epoch_log.info(format_stop(self.phase, self.patience, self.best_epoch))
        self.pending = None

    @property
    def improved(self) -> bool:
        """Whether the last epoch recorded is the best so far."""
        return self.best_epoch == self.epochs_done

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.best_val_loss)

    def phase_record(self, best_checkpoint: str, parameters: tuple[int, int], fit_seconds: float, *,
                     trained_blocks: int | None = None, precision: str | None = None) -> PhaseRecord:
        """The phase's record once it ends; ``parameters`` is (trainable, total)."""
        usable = not self.diverged
        return PhaseRecord(
            done=True, best_checkpoint=best_checkpoint, diverged=self.diverged,
            best_val_loss=rounded(self.best_val_loss) if usable else None,
            best_val_acc=rounded(self.best_val_acc) if usable else None,
            best_epoch=self.best_epoch if usable else None, epochs=self.epochs_done,
            trainable_parameters=parameters[0], total_parameters=parameters[1], trained_blocks=trained_blocks,
            fit_seconds=round(fit_seconds, 3), precision=precision, stopped_at_time_limit=self.time_limited or None,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_done": self.epochs_done, "best_val_loss": self.best_val_loss,
                "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch,
                "epochs_without_improvement": self.epochs_without_improvement}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs_done = int(state["epochs_done"])
        self.best_val_loss = float(state["best_val_loss"])
        self.best_val_acc = float(state["best_val_acc"])
        self.best_epoch = int(state["best_epoch"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])
