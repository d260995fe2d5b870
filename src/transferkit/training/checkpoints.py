"""How training checkpoints are written and read: safely on a full disk, and never as code.

Lightning's own atomic save builds the file elsewhere and moves it, which across file systems
(a Docker volume, NFS) is a plain copy: a full disk leaves a half-written ``-last.ckpt`` that
every resume then fails on. Here the file is written and flushed next to its destination and
renamed, so a checkpoint on disk is always a whole one. Every checkpoint is read with
``weights_only=True``, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, so a crafted
checkpoint in a run folder cannot run code on ``--resume``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

from transferkit._io import atomic_write, stops_held
from transferkit.errors import refused_pickle


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's weights in a training checkpoint, named as in the model (without Lightning's ``model.``)."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def checkpoint_problem(path: Path, shapes: dict[str, torch.Size] | None = None) -> str | None:
    """None when ``path`` loads as a checkpoint (whose weights fit a model of ``shapes``, its
    state dict's shapes, where given), else why not, in a few words."""
    try:
        checkpoint = load_checkpoint(path)
    except Exception as error:  # truncated, not a zip, refused pickle: all mean "unusable"
        if refused := refused_pickle(error):
            return f"holds something other than tensors, refused: {refused}"
        return " ".join(str(error).split())[:160] or type(error).__name__
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "not a training checkpoint"
    return None if shapes is None else misfit(model_state(checkpoint), shapes)


def misfit(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> str | None:
    """None when every weight of ``state`` fits a model of ``shapes``, else the first that does not."""
    for name, tensor in state.items():
        if name not in shapes:
            return f"its weight {name} is not in this run's model: written for another model"
        if tensor.shape != shapes[name]:
            return (f"its {name} is {list(tensor.shape)} where this run's model has {list(shapes[name])}: "
                    "written for another model or class list")
    return None


def collect_random_state() -> dict[str, Any]:
    """The torch, NumPy and Python generators, in types ``weights_only`` loading accepts: with
    them a resumed run draws the shuffles, augmentations and dropout masks of one never stopped."""
    states = _collect_rng_states()
    if "numpy" in states:
        kind, keys, position, has_gauss, gauss = states["numpy"]
        states["numpy"] = (kind, keys.tolist(), position, has_gauss, gauss)
    return states


def restore_random_state(states: dict[str, Any]) -> None:
    if "numpy" in states:
        kind, keys, position, has_gauss, gauss = states["numpy"]
        states = {**states, "numpy": (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss)}
    if not torch.cuda.is_available():
        states = {k: v for k, v in states.items() if k != "torch.cuda"}
    _set_rng_states(states)


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``checkpoint`` so that ``path`` always holds a whole one; a stop asked meanwhile
    takes effect once it is written, so the work it holds is kept."""
    # Serialised in memory first, as Lightning does: a failing write is then the OSError of a
    # plain file write (ENOSPC names the file), not torch's stream-writer RuntimeError.
    buffer = io.BytesIO()

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not overtake the data on a power cut

    with stops_held():
        torch.save(checkpoint, buffer)
        atomic_write(path, write)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin with the writes and reads described above."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Callable[..., Any] | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint(path)
