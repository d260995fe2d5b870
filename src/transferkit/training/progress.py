"""The phases of one run so far (``progress.json``): which finished, which checkpoint an
interrupted one continues from, the weights each left, and which is best."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.errors import TrainingDivergedError
from transferkit.run.folder import RunFolder
from transferkit.run.records import PhaseRecord
from transferkit.training.checkpoints import checkpoint_problem, load_checkpoint, model_state

log = logging.getLogger(__name__)


class PhaseProgress:
    """What the phases of the run in ``folder`` left. Only a ``write`` process (rank zero)
    changes the folder; every process makes the same choices from it.

    ``create_pretrained`` builds the model as it was before any phase (the pretrained backbone
    under a new head): a head-only checkpoint of the features phase, loaded after fine-tuning
    changed the backbone, goes back under it. A checkpoint whose weights do not fit ``model``
    (another run's, with other classes) counts as damaged. ``loggers`` (``--logger``) get every
    phase's epochs.
    """

    def __init__(
        self, folder: RunFolder, write: bool, create_pretrained: Callable[[], nn.Module], model: nn.Module,
        loggers: Sequence[Any] = (),
    ):
        self.folder = folder
        self.loggers = loggers
        self.write = write
        self.create_pretrained = create_pretrained
        self.shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
        self.phases = folder.read_progress()
        self.backbone_pretrained = True

    def finished(self, name: str) -> bool:
        """Whether phase ``name`` finished in an earlier invocation and its best checkpoint still
        loads; a damaged one sends the phase back to training, with a warning."""
        record = self.phases.get(name)
        if record is None or not record.done:
            return False
        best = self.folder.root / record.best_checkpoint
        problem = checkpoint_problem(best, self.shapes)
        if problem is None:
            return True
        log.warning("phase %s: its best checkpoint %s is damaged (%s); training the phase again", name, best, problem)
        del self.phases[name]
        if self.write:
            os.replace(best, best.with_name(best.name + ".damaged"))
            # The last checkpoint of a finished phase resumes to its end, with no epochs left to train.
            self.folder.checkpoint(name, "last").unlink(missing_ok=True)
        return False

    def resume_from(self, name: str) -> Path | None:
        """The checkpoint an interrupted phase continues from: the last one, else the best one
        (a few epochs lost), else none (the phase starts again); never a traceback."""
        for kind in ("last", "best"):
            path = self.folder.checkpoint(name, kind)
            if not path.is_file():
                continue
            problem = checkpoint_problem(path, self.shapes)
            if problem is None:
                return path
            if self.write:  # every process makes the same choice; one renames
                damaged = path.with_name(path.name + ".damaged")
                os.replace(path, damaged)
                log.warning("phase %s: checkpoint %s is damaged (%s), kept as %s; trying an earlier one",
                            name, path, problem, damaged.name)
        return None

    def record(self, name: str, record: PhaseRecord, lr_flag: str, lr: float) -> None:
        self.phases[name] = record
        if record.diverged:
            log.warning(
                "phase %s diverged: its validation loss is not finite, so its weights are not used; "
                "lower %s (now %g)", name, lr_flag, lr,
            )
        if self.write:
            self.folder.write_progress(self.phases)

    def usable(self) -> dict[str, PhaseRecord]:
        return {name: phase for name, phase in self.phases.items() if not phase.diverged}

    def best_phase(self) -> str:
        usable = self.usable()
        if not usable:
            raise TrainingDivergedError(
                f"every phase diverged (validation loss not finite) in {self.folder.root}; "
                "train again with lower --frozen-lr and --finetune-lr"
            )
        return min(usable, key=lambda name: usable[name].best_val_loss)  # type: ignore[arg-type, return-value]

    def load_last_usable(self, model: nn.Module) -> None:
        """The best weights so far, those of the last phase that did not diverge: where the next phase starts."""
        usable = self.usable()
        if usable:
            self.load(model, list(usable)[-1])

    def load(self, model: nn.Module, name: str) -> None:
        """Phase ``name``'s best weights into ``model``."""
        checkpoint = load_checkpoint(self.folder.root / self.phases[name].best_checkpoint)
        state = model_state(checkpoint)
        whole = len(state) == len(model.state_dict())
        if not whole and not self.backbone_pretrained:
            with torch.random.fork_rng():
                state = {**self.create_pretrained().state_dict(), **state}
        model.load_state_dict(state, strict=len(state) == len(model.state_dict()))
