"""Lightning's names for where and how training runs (accelerator, devices, strategy,
precision), checked before any work: Lightning itself would fail only once the data had been
scanned and the features computed."""

from __future__ import annotations

import typing

from transferkit.errors import ConfigError, close_matches


def parse_devices(devices: str) -> int | list[int] | str:
    """Lightning's ``devices``: 'auto', a count (-1 for all), or a comma-separated list of indices."""
    text = str(devices).strip()
    if text == "auto":
        return text
    if "," in text:
        indices = [part.strip() for part in text.split(",") if part.strip()]
        if not indices or not all(part.isdigit() for part in indices):
            raise ValueError(text)
        return [int(part) for part in indices]
    count = int(text)
    if count == 0 or count < -1:
        raise ValueError(text)
    return count


def lightning_option_problems(accelerator: str, strategy: str, precision: str) -> list[str]:
    """A problem for each name Lightning does not know, with the closest ones; Lightning is
    imported only to check a value that is not the default."""
    if (accelerator, strategy, precision) == ("auto", "auto", "auto"):
        return []
    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    choices = {
        "accelerator": ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())],
        "strategy": ["auto", *StrategyRegistry.available_strategies()],
        "precision": ["auto", *typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS)],
    }
    found = []
    values = {"accelerator": accelerator, "strategy": strategy, "precision": precision}
    for name, allowed in choices.items():
        value = values[name]
        if value not in allowed:
            shown = ", ".join(allowed[:8]) + (", ..." if len(allowed) > 8 else "")
            found.append(f"--{name} {value!r} is not one Lightning knows ({shown}).{close_matches(value, allowed)}")
    return found


def trainer_options(
    accelerator: str, devices: str, num_nodes: int, strategy: str, precision: str
) -> dict[str, typing.Any]:
    """``L.Trainer``'s keyword arguments for these choices, once Lightning has judged them on
    this machine (``--accelerator gpu`` where no GPU is visible), before the data scan.

    Precision 'auto' is 'bf16-mixed' where training runs on a CPU with AMX or AVX512-BF16 (see
    ``training.precision``), else '32-true'. On GPUs it stays '32-true': on an H200, bf16-mixed
    fine-tuning of Lite0 at batch 32 took 1.3-2x as long (README, Precision)."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import CPUAccelerator

    from transferkit.training.precision import cpu_computes_bf16

    options = {
        "accelerator": accelerator, "devices": parse_devices(devices), "num_nodes": num_nodes,
        "strategy": strategy, "precision": "32-true" if precision == "auto" else precision,
    }
    try:
        trainer = L.Trainer(**options, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
    except (MisconfigurationException, ImportError, ValueError, TypeError) as error:
        # Lightning names the missing package (torch_xla for tpu, transformer_engine) or the
        # combination it refuses (fsdp or --devices -1 on a CPU) with these too, not only the
        # first; only its constructor runs in here.
        raise ConfigError([f"--accelerator {accelerator} --devices {devices} --strategy "
                           f"{strategy} --precision {precision}: {error}"]) from None
    if precision == "auto" and isinstance(trainer.accelerator, CPUAccelerator) and cpu_computes_bf16():
        options["precision"] = "bf16-mixed"
    return options


def process_rank() -> int:
    """This process's global rank: from Lightning once training set it up, else from the
    launcher's environment (0 when training alone)."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))
