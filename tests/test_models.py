from __future__ import annotations

import json

import time
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from torch import nn

from conftest import SHARED_DATASETS, TINY_MODEL, make_folder, tiny_config
from transferkit.models.create import classifier_path, create_classifier
from transferkit.models.folder import load_model, save_model_folder
from transferkit.models.freeze import backbone_blocks, freeze_backbone, parameter_groups, set_batchnorm_mode, unfreeze_top
from transferkit.config import ModelConfig
from transferkit.data.images import load_image
from transferkit.data.transforms import create_transform
from transferkit.data.loaders import resolve_preprocessing
from transferkit.errors import ConfigError, WeightsUnavailableError
from transferkit.commands.export import export
from transferkit.inference.loading import load_predictor
from transferkit.inference.predictor import preprocessed_batches, softmax
from transferkit.models.weights import embedded_weights_file, load_embedded_state_dict


def tiny(weights: Path, **kwargs: object) -> nn.Module:
    return create_classifier(ModelConfig(name=TINY_MODEL, weights=str(weights), **kwargs), num_classes=3)


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_weights_file_loads_into_the_backbone_and_the_head_is_new(tiny_weights: Path) -> None:
    model = tiny(tiny_weights)
    saved = torch.load(tiny_weights, weights_only=True)
    assert torch.equal(model.state_dict()["conv_stem.weight"], saved["conv_stem.weight"])
    assert model.get_classifier().out_features == 3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_binary_problems_get_two_logits(tiny_weights: Path) -> None:
    model = create_classifier(ModelConfig(name=TINY_MODEL, weights=str(tiny_weights)), num_classes=2)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_freeze_backbone_leaves_only_the_head_trainable(tiny_weights: Path) -> None:
    model = tiny(tiny_weights)
    freeze_backbone(model)
    assert trainable_names(model) == {"classifier.weight", "classifier.bias"}


def test_unfreeze_top_blocks_by_count_fraction_and_all(tiny_weights: Path) -> None:
    model = tiny(tiny_weights)
    blocks = backbone_blocks(model)
    assert len(blocks) >= 4 and "conv_stem.weight" in blocks[0]
    head = {"classifier.weight", "classifier.bias"}
    assert unfreeze_top(model, 2) == 2
    assert trainable_names(model) == head | set(blocks[-1]) | set(blocks[-2])
    assert unfreeze_top(model, 0.5) == round(len(blocks) * 0.5)
    assert "conv_stem.weight" not in trainable_names(model)
    assert unfreeze_top(model, None) == len(blocks)
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}


def test_frozen_batchnorm_keeps_its_statistics_while_unfrozen_affine_parameters_train(tiny_weights: Path) -> None:
    model = tiny(tiny_weights)
    unfreeze_top(model, 1)
    before = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
    model.train()
    set_batchnorm_mode(model, "frozen")
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    optimizer.step()
    after = dict(model.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)
    top_bn = [n for n in trainable_names(model) if "bn" in n]
    assert top_bn, "batch-norm affine parameters of the unfrozen block train"


def test_train_policy_updates_statistics_of_unfrozen_blocks_only(tiny_weights: Path) -> None:
    model = tiny(tiny_weights)
    unfreeze_top(model, 1)
    model.train()
    set_batchnorm_mode(model, "train")
    training = {
        name: module.training for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)
    }
    top_block = {n.rsplit(".", 1)[0] for n in backbone_blocks(model)[-1]}
    assert any(training[n] for n in training if n in top_block)
    assert not any(training[n] for n in training if n not in top_block)


def test_parameter_groups_hold_only_trainable_parameters_without_decay_on_norms(tiny_weights: Path) -> None:
    model = tiny(tiny_weights)
    unfreeze_top(model, 1)
    groups = {g["name"]: g for g in parameter_groups(model, lr=3e-4, weight_decay=0.05)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["lr"] == 3e-4 for g in groups.values())
    assert groups["head"]["weight_decay"] == 0.05 and groups["head_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])


def test_hidden_dense_head(tiny_weights: Path) -> None:
    model = tiny(tiny_weights, hidden_size=32)
    linear_layers = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear_layers] == [(model.num_features, 32), (32, 3)]
    freeze_backbone(model)
    assert trainable_names(model) == {f"classifier.{i}.{k}" for i in (0, 3) for k in ("weight", "bias")}


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match="unknown model 'mobilenetv2_10'.*Did you mean: .*mobilenetv2_100"):
        create_classifier(ModelConfig(name="mobilenetv2_10"), 2)


def test_missing_weights_fail_fast_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        create_classifier(ModelConfig(name="resnet18", weights=str(tmp_path / "nope.pth")), 2)
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="not cached and the model hub cannot be reached.*--weights none"):
        create_classifier(ModelConfig(name="resnet10t"), 2)
    assert time.perf_counter() - started < 15, "offline failure must not wait for the hub's retries"


def test_model_folder_rebuilds_with_plain_timm(tmp_path: Path, tiny_weights: Path) -> None:
    model = tiny(tiny_weights).eval()
    preprocessing = resolve_preprocessing(model, 64)
    save_model_folder(model, tmp_path / "model", ["a", "b", "c"], preprocessing, ModelConfig(name=TINY_MODEL))
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), rebuilt(x))
    assert rebuilt.pretrained_cfg["input_size"] == [3, 64, 64]
    loaded, config = load_model(tmp_path / "model")
    assert config["label_names"] == ["a", "b", "c"]
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


def test_hidden_head_model_folder_rebuilds_with_load_model(tmp_path: Path, tiny_weights: Path) -> None:
    model = tiny(tiny_weights, hidden_size=16).eval()
    preprocessing = resolve_preprocessing(model, 64)
    config = ModelConfig(name=TINY_MODEL, hidden_size=16)
    save_model_folder(model, tmp_path / "model", ["a", "b", "c"], preprocessing, config)
    loaded, _ = load_model(tmp_path / "model")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


ARCHITECTURES = ["test_efficientnet", "test_convnext", "test_resnet", "test_vit"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_blocks_cover_the_backbone_once_and_the_top_block_unfreezes_first(architecture: str) -> None:
    model = create_classifier(ModelConfig(name=architecture, weights="none"), num_classes=3)
    blocks = backbone_blocks(model)
    head = {f"{classifier_path(model)}.{n}" for n, _ in model.get_classifier().named_parameters()}
    named = [name for block in blocks for name in block]
    assert len(named) == len(set(named)) and set(named) | head == {n for n, _ in model.named_parameters()}
    assert len(blocks) >= 4 and all(len(block) > 2 for block in blocks), "no block is a lone norm"
    assert unfreeze_top(model, 1) == 1
    assert trainable_names(model) == head | set(blocks[-1])
    freeze_backbone(model)
    assert trainable_names(model) == head


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_trains_saves_reloads_exports_and_predicts_alike(architecture: str, tmp_path: Path) -> None:
    from transferkit import train

    data = make_folder(tmp_path / "data", per_class=8)
    config = tiny_config(
        tmp_path / "run", Path("none"),
        **{"model.name": architecture, "frozen.epochs": 1, "finetune.epochs": 1, "finetune.unfreeze": "1"},
    )
    run_dir = train(data, config).run_dir
    predictor = load_predictor(run_dir)
    assert predictor.preprocessing["input_size"] == (3, 64, 64)

    rebuilt = timm.create_model(f"local-dir:{run_dir / 'model'}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config({}, model=rebuilt)
    assert tuple(data_config["input_size"]) == (3, 64, 64), "timm reads the size trained at from the model folder"
    assert data_config["mean"] == pytest.approx(predictor.preprocessing["mean"])
    assert data_config["std"] == pytest.approx(predictor.preprocessing["std"])

    exported = export(run_dir, output=tmp_path / "model.onnx")
    assert exported.max_abs_diff < 1e-4

    paths = sorted(str(path) for path in data.rglob("*.jpg"))
    batch = np.concatenate(list(preprocessed_batches(paths, predictor.preprocessing)))
    temperature = json.loads((run_dir / "model" / "config.json").read_text())["transferkit"]["calibration"]["temperature"]
    with torch.no_grad():
        expected = softmax(rebuilt(torch.from_numpy(batch)).numpy() / temperature)
    assert expected.shape == (len(paths), 2) and np.isfinite(expected).all()
    for source in (run_dir, run_dir / "model", tmp_path / "model.onnx"):
        assert np.allclose(load_predictor(source).probabilities(paths), expected, atol=1e-5), source


@pytest.mark.skipif(not (SHARED_DATASETS / "hymenoptera").is_dir(), reason="needs ../shared/datasets")
def test_embedded_efficientnet_lite0_weights_recognise_ants_and_bees() -> None:
    model = create_classifier(ModelConfig(), num_classes=2).eval()
    imagenet = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    imagenet.load_state_dict(
        load_embedded_state_dict(imagenet, embedded_weights_file("tf_efficientnet_lite0"))
    )
    preprocessing = resolve_preprocessing(model)
    assert preprocessing["mean"] == (0.5, 0.5, 0.5)
    assert preprocessing["input_size"] == (3, 256, 256), "the embedded weights' test size, not the 224 px they trained at"
    assert resolve_preprocessing(model, image_size=180)["input_size"] == (3, 180, 180), "--image-size still wins"
    transform = create_transform(preprocessing)
    ants = sorted((SHARED_DATASETS / "hymenoptera" / "val" / "ants").glob("*.jpg"))[:6]
    bees = sorted((SHARED_DATASETS / "hymenoptera" / "val" / "bees").glob("*.jpg"))[:6]
    batch = torch.stack([transform(load_image(p)) for p in ants + bees])
    with torch.no_grad():
        predicted = imagenet(batch).argmax(1).tolist()
    # ImageNet class 310 is "ant", 309 is "bee".
    assert sum(p == 310 for p in predicted[:6]) >= 4 and sum(p == 309 for p in predicted[6:]) >= 4
    assert torch.equal(model.conv_stem.weight, imagenet.conv_stem.weight)
