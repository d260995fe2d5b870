"""bf16 mixed precision on the CPU: chosen by 'auto' only where the CPU has AMX, depthwise
convolutions kept in float32, a step that trains as the float32 step does, and a model handed
back as it was. On a GPU, inference in full float32 whatever TF32 setting the user chose."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import tiny_config
from test_activations import TARGETS, assert_same_step, classifier_and_whole_step, created, loss_and_gradients
from transferkit import train
from transferkit.training.trainer_options import trainer_options
from transferkit.inference.predictor import exact_float32
from transferkit.run.folder import RunFolder
from transferkit.training.lightning import FineTuning, ImageClassifier, fit_with_lightning
from transferkit.training.precision import DepthwiseInFloat32


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to say what this CPU has")
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "flags:").split(":")[1].split())


def test_auto_precision_is_bf16_mixed_exactly_on_a_cpu_with_bf16_instructions() -> None:
    knows = hasattr(torch.cpu, "get_capabilities")  # an older torch cannot tell, and trains in float32
    expected = "bf16-mixed" if knows and {"amx_bf16", "avx512_bf16"} & cpu_flags() else "32-true"
    assert trainer_options("cpu", "1", 1, "auto", "auto")["precision"] == expected
    assert trainer_options("cpu", "1", 1, "auto", "32-true")["precision"] == "32-true", "a choice is kept"


def test_a_run_records_the_precision_each_phase_trained_in(image_folder: Path, tmp_path: Path, tiny_weights: Path) -> None:
    expected = trainer_options("auto", "auto", 1, "auto", "auto")["precision"]
    result = train(image_folder, tiny_config(tmp_path / "run", tiny_weights, **{"finetune_on": "activations"}))
    assert result.metrics["phases"]["finetune"]["precision"] == expected
    assert "precision" not in result.metrics["phases"]["frozen"], "the head on features trains in float32"
    recorded = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert recorded["precision"] == "auto", "a resume on another machine chooses for that machine"


def test_a_bf16_fit_on_the_cpu_runs_trained_depthwise_convolutions_in_float32_and_hands_the_model_back(
    tmp_path: Path,
) -> None:
    model = created("test_efficientnet")  # its two depthwise convolutions are in its top two blocks
    finetuning = FineTuning("finetune", tiny_config(tmp_path, tmp_path).finetune, 1, "frozen")
    module = ImageClassifier(model, nn.CrossEntropyLoss(), finetuning)
    batches = DataLoader(TensorDataset(torch.randn(8, 3, 64, 64), TARGETS), batch_size=4)
    dtypes = convolution_dtypes(model)
    folder = RunFolder(tmp_path / "run")
    options = {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}

    fit_with_lightning(module, batches, batches, folder=folder, name="finetune", resume_from=None,
                       trainer_options=options, progress_bar=False)
    assert dtypes["trained depthwise, training"] == {torch.float32}, "its backward is slow in bf16"
    assert dtypes["trained depthwise, validation"] == {torch.bfloat16}, "its forward is not"
    assert dtypes["frozen depthwise, training"] == {torch.bfloat16}, "no backward runs through the frozen bottom"
    assert dtypes["pointwise, training"] == {torch.bfloat16}
    assert not any("forward" in vars(m) for m in model.modules()), "the model is handed back as it was"

    def failing() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield next(iter(batches))
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="disk went away"):
        fit_with_lightning(module, IterableLoader(failing), batches, folder=RunFolder(tmp_path / "failed"),
                           name="finetune", resume_from=None, trainer_options=options, progress_bar=False)
    assert not any("forward" in vars(m) for m in model.modules()), "a failed fit hands it back too"


class IterableLoader:
    def __init__(self, batches: Any):
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def __len__(self) -> int:
        return 2


def convolution_dtypes(model: nn.Module) -> dict[str, set[torch.dtype]]:
    """The output dtypes each kind of convolution of ``model`` gives from now on, in training
    steps and in validation."""
    seen: dict[str, set[torch.dtype]] = defaultdict(set)

    def record(conv: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if conv.groups == 1:
            kind = "pointwise"
        elif conv.groups == conv.in_channels:
            kind = f"{'trained' if conv.weight.requires_grad else 'frozen'} depthwise"
        else:
            return
        seen[f"{kind}, {'training' if torch.is_grad_enabled() else 'validation'}"].add(output.dtype)

    for conv in model.modules():
        if isinstance(conv, nn.Conv2d):
            conv.register_forward_hook(record)
    return seen


def test_a_bf16_step_on_the_cpu_has_the_loss_and_gradients_of_the_float32_step(tmp_path: Path) -> None:
    module, images, whole = classifier_and_whole_step(tmp_path)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    float32 = DepthwiseInFloat32()

    float32.setup(trainer, module, "fit")
    with trainer.precision_plugin.forward_context():
        logits = module(images)
    step = loss_and_gradients(module.model, logits.float())
    float32.teardown(trainer, module, "fit")
    assert_same_step(step, whole, 0.05)


def test_gpu_inference_turns_tf32_off_and_hands_back_the_users_own_setting() -> None:
    backends = torch.backends
    if not hasattr(getattr(backends.cudnn, "conv", None), "fp32_precision"):
        pytest.skip("this torch has only the older allow_tf32 switches")
    # The switches are process-wide; a GPU is not needed to set them.
    saved = (backends.fp32_precision, backends.cudnn.fp32_precision, backends.cudnn.conv.fp32_precision,
             backends.cuda.matmul.fp32_precision)
    try:
        # What a user speeding up their own training writes. After it, reading the older
        # allow_tf32 switches raises, so inference must not read them.
        backends.fp32_precision = "tf32"
        with exact_float32("cuda"):
            assert (backends.cudnn.conv.fp32_precision, backends.cuda.matmul.fp32_precision) == ("ieee", "ieee")
        assert (backends.cudnn.conv.fp32_precision, backends.cuda.matmul.fp32_precision) == ("tf32", "tf32")
        with exact_float32("cpu"):
            assert backends.cudnn.conv.fp32_precision == "tf32", "nothing to switch for a CPU pass"
    finally:
        backends.fp32_precision, backends.cudnn.fp32_precision = saved[:2]
        backends.cudnn.conv.fp32_precision, backends.cuda.matmul.fp32_precision = saved[2:]
