"""Fine-tuning on cached boundary activations: the split is exact, one step equals the step
through the whole model, the cache is reused and keyed by what decides it, and a model that
cannot be split fine-tunes on images and says why."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import yaml
from torch.nn import functional as F

from conftest import tiny_config
from transferkit import evaluate, train
from transferkit.data.transforms import augment
from transferkit.models.create import create_classifier
from transferkit.models.freeze import set_batchnorm_mode, unfreeze_top
from transferkit.models.split import Bottom, activation_bytes, boundary_index, forward_bottom, forward_top, layer_sequence
from transferkit.config import ModelConfig
from transferkit.errors import ConfigError


def created(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_classifier(ModelConfig(name=name, weights="none", drop_rate=0.0), num_classes=3)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
@pytest.mark.parametrize("unfreeze", [0, 1, 3])
def test_the_top_on_boundary_activations_is_the_whole_model(name: str, unfreeze: int) -> None:
    model = created(name).eval()
    boundary = boundary_index(model, unfreeze)
    assert boundary is not None
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        cached = forward_bottom(model, images, boundary)
        assert torch.equal(Bottom(model, boundary)(images), cached)
        assert torch.allclose(forward_top(model, cached, boundary), model(images), atol=1e-6)
    unfreeze_top(model, unfreeze)
    below = {f"{layer}.{p}" for layer, module in layer_sequence(model)[:boundary]
             for p, _ in module.named_parameters()}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in below), "nothing below trains"


def test_every_block_trained_or_an_unsplittable_family_has_no_boundary() -> None:
    assert boundary_index(created("test_efficientnet"), None) is None
    assert boundary_index(created("test_convnext"), 1) is None


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_one_step_on_cached_activations_has_the_loss_and_gradients_of_the_whole_model(
    dtype: torch.dtype, tolerance: float, layout: torch.memory_format
) -> None:
    model = created("test_efficientnet")
    boundary = boundary_index(model, 2)
    assert boundary is not None
    unfreeze_top(model, 2)
    set_batchnorm_mode(model, "frozen")
    images = torch.randn(8, 3, 64, 64)
    whole = loss_and_gradients(model, model(images))
    with torch.no_grad():
        cached = forward_bottom(model, images, boundary).to(dtype)  # what the cache holds
    model.to(memory_format=layout)  # fine-tuning trains channels-last
    split = loss_and_gradients(model, forward_top(model, cached.float().contiguous(memory_format=layout), boundary))
    assert_same_step(split, whole, tolerance)


def test_a_step_on_images_channels_last_has_the_loss_and_gradients_of_the_whole_model(tmp_path: Path) -> None:
    module, images, whole = classifier_and_whole_step(tmp_path)
    module.model.to(memory_format=torch.channels_last)  # as FineTuning.setup leaves it
    assert_same_step(loss_and_gradients(module.model, module(images)), whole, 1e-5)


def test_the_module_on_activations_gives_the_whole_models_logits_and_saves_its_weights_by_their_names(
    tmp_path: Path,
) -> None:
    from transferkit.training.lightning import AboveBoundary, FineTuning, ImageClassifier

    model = created("test_efficientnet").eval()
    boundary = boundary_index(model, 2)
    assert boundary is not None
    images = torch.randn(4, 3, 64, 64)
    finetuning = FineTuning("finetune", tiny_config(tmp_path, tmp_path).finetune, 2, "frozen")
    module = ImageClassifier(model, torch.nn.CrossEntropyLoss(), finetuning, AboveBoundary(model, boundary, "strong"))
    with torch.no_grad():
        logits = module(forward_bottom(model, images, boundary).half())
        assert torch.allclose(logits, model(images), atol=2e-2), "float16 activations, no augmentation outside training"
    assert set(module.state_dict()) == {f"model.{name}" for name in model.state_dict()}, "a resume loads either kind"


def classifier_and_whole_step(tmp_path: Path) -> tuple[Any, torch.Tensor, tuple[float, dict[str, torch.Tensor]]]:
    """A fine-tuning module whose top two blocks train, a batch of images, and the loss and
    gradients of one step through the plain model in float32."""
    from transferkit.training.lightning import FineTuning, ImageClassifier

    model = created("test_efficientnet")
    unfreeze_top(model, 2)
    set_batchnorm_mode(model, "frozen")
    images = torch.randn(8, 3, 64, 64)
    whole = loss_and_gradients(model, model(images))
    finetuning = FineTuning("finetune", tiny_config(tmp_path, tmp_path).finetune, 2, "frozen")
    return ImageClassifier(model, torch.nn.CrossEntropyLoss(), finetuning), images, whole


TARGETS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def loss_and_gradients(model: torch.nn.Module, logits: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = F.cross_entropy(logits, TARGETS)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(split: tuple[float, dict[str, torch.Tensor]], whole: tuple[float, dict[str, torch.Tensor]],
                     tolerance: float) -> None:
    assert split[0] == pytest.approx(whole[0], rel=tolerance)
    assert len(whole[1]) > 2, "the top's blocks and the head all have gradients"
    for name, gradient in whole[1].items():
        scale = float(gradient.abs().max()) or 1.0
        assert float((split[1][name] - gradient).abs().max()) <= tolerance * scale, name


def test_activation_augmentation_mirrors_and_shifts_maps() -> None:
    batch = torch.randn(64, 3, 4, 4).to(torch.float16)
    torch.manual_seed(1)
    light = augment(batch, "light")
    assert light.shape == batch.shape and light.dtype == batch.dtype
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(light, batch)]
    assert all(m or torch.equal(a, b) for m, a, b in zip(mirrored, light, batch)), "each map kept or mirrored"
    assert 16 < sum(mirrored) < 48, "about half are mirrored"

    strong = augment(batch, "strong")
    padded = torch.nn.functional.pad(batch.float(), (1, 1, 1, 1), mode="replicate").to(batch.dtype)
    shifts = set()
    for original, augmented, edges in zip(batch, strong, padded):
        for source, frame in ((original, edges), (original.flip(-1), edges.flip(-1))):
            for dy in range(3):
                for dx in range(3):
                    if torch.equal(augmented, frame[:, dy : dy + 4, dx : dx + 4]):
                        shifts.add((dy, dx))
    assert len(shifts) > 4, "maps are moved by up to a cell in every direction"
    assert torch.equal(augment(batch, "none"), batch)


def test_finetune_on_activations_trains_and_a_rerun_reads_them_from_the_cache(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, feature_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"finetune_on": "activations", "finetune.unfreeze": "2", "finetune.epochs": 2, "finetune.patience": 2}
    with caplog.at_level(logging.INFO, logger="transferkit"):
        first = train(image_folder, tiny_config(tmp_path / "first", tiny_weights, **options))
    assert [r for r in first.metrics["phases"]] == ["frozen", "finetune"]
    assert first.metrics["phases"]["finetune"]["epochs"] == 2
    assert first.metrics["val"]["accuracy"] >= 0.8
    assert first.metrics["features"]["from_cache"] == 0, "the run computed its features, in the activations' pass"
    folders = [p.name for p in feature_cache.iterdir() if "-after-" in p.name]
    assert len(folders) == 1, folders
    shard = next((feature_cache / folders[0]).glob("*.npz"))
    with np.load(shard) as stored:
        assert stored["features"].dtype == np.float16 and stored["features"].ndim == 4

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transferkit"):
        train(image_folder, tiny_config(tmp_path / "second", tiny_weights, **options))
    assert "fine-tuning on images" not in caplog.text
    assert "features: 50 images, 50 from the cache" in caplog.text
    assert "activations and features: 50 images, 50 from the cache" in caplog.text

    other = train(image_folder, tiny_config(tmp_path / "third", tiny_weights, **{**options, "finetune.unfreeze": "1"}))
    assert other.metrics["val"]["accuracy"] >= 0.8
    assert len([p for p in feature_cache.iterdir() if "-after-" in p.name]) == 2, "another boundary, another cache"


def test_the_pass_that_caches_activations_stores_the_backbones_own_features_for_every_other_run(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, feature_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transferkit.data.folders import discover
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.cache.passes import cached_pooled_features, extract_features

    with caplog.at_level(logging.INFO, logger="transferkit"):
        train(image_folder, tiny_config(tmp_path / "activations", tiny_weights, finetune_on="activations"))
    assert "activations and features: 50 images, 0 from the cache" in caplog.text
    assert "features: 50 images, 50 from the cache" in caplog.text, "the activations' pass stored them"

    model = create_classifier(tiny_config(tmp_path / "x", tiny_weights).model, 2, 64)
    preprocessing = resolve_preprocessing(model, 64)
    paths = sorted(path for items in discover(image_folder, seed=0).splits.values() for path, _ in items)
    from_images = extract_features(model, paths, preprocessing, backend="cpu")
    cached, stats = cached_pooled_features(model, paths, preprocessing, "avg", "onnx")
    assert stats.from_cache == len(paths)
    assert np.allclose(cached, from_images, atol=1e-4), "float32 activations: the features of the image itself"

    frozen_only = train(image_folder, tiny_config(tmp_path / "frozen", tiny_weights, **{"finetune.epochs": 0}))
    assert frozen_only.metrics["features"]["from_cache"] == 50


def test_the_run_judges_the_fine_tuned_phase_on_activations_as_its_model_does_on_images(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, feature_cache: Path
) -> None:
    options = {"finetune_on": "activations", "frozen.epochs": 0, "finetune.epochs": 2, "finetune.lr": 0.01}
    result = train(image_folder, tiny_config(tmp_path / "run", tiny_weights, **options))
    assert result.best_phase == "finetune"
    from_activations = (result.run_dir / "evaluation" / "val" / "predictions.csv").read_text().splitlines()
    evaluate(result.run_dir, split="val", output=tmp_path / "on-images")
    from_images = (tmp_path / "on-images" / "predictions.csv").read_text().splitlines()
    assert len(from_images) == len(from_activations) > 1
    for cached_row, image_row in zip(from_activations[1:], from_images[1:]):
        cached_fields, image_fields = cached_row.split(","), image_row.split(",")
        assert cached_fields[:3] == image_fields[:3], "the same image, label and predicted class"
        assert abs(float(cached_fields[3]) - float(image_fields[3])) < 2e-3, (cached_row, image_row)


def test_a_model_that_cannot_be_split_fine_tunes_on_images_and_says_why(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = tmp_path / "convnext.pth"
    torch.save(timm.create_model("test_convnext", pretrained=False).state_dict(), weights)
    config = tiny_config(tmp_path / "run", weights, **{"model.name": "test_convnext", "finetune_on": "auto"})
    with caplog.at_level(logging.INFO, logger="transferkit"):
        train(image_folder, config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning on images")]
    assert lines == ["fine-tuning on images: ConvNeXt has no layer sequence to split (EfficientNet and ResNet families do)"]


def test_asking_for_activations_that_cannot_be_cached_stops_before_training(
    image_folder: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    config = tiny_config(tmp_path / "run", tiny_weights, **{"finetune_on": "activations", "finetune.unfreeze": "all"})
    with pytest.raises(ConfigError, match=r"^--finetune-on activations: every backbone block trains .*--finetune-on auto"):
        train(image_folder, config)
    assert not list((tmp_path / "run").rglob("*.ckpt")), "nothing trained"
    rerun = train(image_folder, dataclasses.replace(config, finetune_on="auto"))  # the same folder takes the fix
    assert list(rerun.metrics["phases"]) == ["frozen", "finetune"]


def test_activations_over_the_disk_budget_fine_tune_on_images_and_say_why(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, feature_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(tmp_path / "run", tiny_weights, **{"finetune_on": "auto", "activation_cache_gb": 1e-6})
    with caplog.at_level(logging.INFO, logger="transferkit"):
        train(image_folder, config)
    assert "fine-tuning on images: the activations would take 0.0 GB, over --activation-cache-gb 1e-06" in caplog.text
    assert not [p for p in feature_cache.iterdir() if "-after-" in p.name]


# --- augmented views of the training images (--finetune-views) ----------------------------------


def cached_rows(folder: Path) -> dict[bytes, np.ndarray]:
    """Every row a cache folder holds, by the digest of its image's content."""
    rows = {}
    for shard in folder.glob("*.npz"):
        with np.load(shard) as stored:
            rows.update((digest.tobytes(), row) for digest, row in zip(stored["digests"], stored["features"]))
    return rows


def test_a_view_is_the_light_augmentation_drawn_from_the_image_content(tmp_path: Path) -> None:
    from PIL import Image
    from torchvision.transforms import functional as TF

    from transferkit.data.images import preprocess_image
    from transferkit.data.transforms import LIGHT_CROP_SCALE, AugmentedView, crop_box

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    preprocessing = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.25,) * 3}
    digest = bytes(range(32))
    views = [AugmentedView(preprocessing, view)(image, digest) for view in range(1, 9)]
    assert all(v.shape == (3, 32, 32) and v.dtype == np.float32 for v in views)
    assert all(np.array_equal(v, AugmentedView(preprocessing, k)(image, digest)) for k, v in zip(range(1, 9), views))
    assert len({v.tobytes() for v in views}) == 8, "every view differs"
    assert not any(np.allclose(v, preprocess_image(image, preprocessing)) for v in views)
    assert not np.array_equal(views[0], AugmentedView(preprocessing, 1)(image, bytes(32))), "another content, another view"

    mirrored = 0
    for view, array in zip(range(1, 9), views):
        # What torchvision's RandomResizedCrop and RandomHorizontalFlip compute for the drawn crop.
        random = np.random.default_rng([int.from_bytes(digest, "big"), view])
        left, top, width, height = crop_box(image.size, random)
        assert LIGHT_CROP_SCALE[0] * 0.9 <= width * height / (80 * 48) <= 1.0
        crop = TF.resized_crop(image, top, left, height, width, [32, 32], TF.InterpolationMode.BICUBIC)
        flip = random.random() < 0.5
        mirrored += flip
        expected = TF.normalize(TF.to_tensor(TF.hflip(crop) if flip else crop), [0.5] * 3, [0.25] * 3).numpy()
        assert np.allclose(array, expected, atol=1e-6), view
    assert 0 < mirrored < 8


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_a_timm_policy_draws_other_views_the_same_for_the_same_image_and_view(policy: str) -> None:
    from PIL import Image

    from transferkit.data.transforms import AugmentedView

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    preprocessing = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3}
    digest = bytes(range(32))
    light = [AugmentedView(preprocessing, view)(image, digest) for view in range(1, 9)]
    drawn = [AugmentedView(preprocessing, view, policy)(image, digest) for view in range(1, 9)]
    assert all(v.shape == (3, 32, 32) and np.isfinite(v).all() for v in drawn)
    assert all(np.array_equal(v, AugmentedView(preprocessing, k, policy)(image, digest)) for k, v in zip(range(1, 9), drawn))
    # RandAugment applies each of its two ops with probability 0.5: some views stay the light ones.
    assert any(not np.array_equal(a, b) for a, b in zip(light, drawn)), "timm's ops change views"
    assert all(a.shape == b.shape for a, b in zip(light, drawn))
    # The policy's draws leave the process's own generators where they were.
    random.seed(7)
    np.random.seed(7)
    AugmentedView(preprocessing, 1, policy)(image, digest)
    assert (random.random(), np.random.random()) == (random.Random(7).random(), np.random.RandomState(7).random_sample())


def test_the_view_policy_changes_the_cached_views_and_is_recorded(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, feature_cache: Path
) -> None:
    options = {"finetune_on": "activations", "finetune_views": 1, "finetune.epochs": 2, "finetune.patience": 2,
               "frozen.epochs": 0}
    train(image_folder, tiny_config(tmp_path / "light", tiny_weights, **options))
    run = train(image_folder, tiny_config(tmp_path / "rand", tiny_weights, **options, finetune_view_policy="randaugment"))
    light, rand = (next(p for p in feature_cache.iterdir() if p.name.endswith(spec)) for spec in
                   (_spec("light"), _spec("randaugment")))
    light_rows, rand_rows = cached_rows(light), cached_rows(rand)
    assert light_rows.keys() == rand_rows.keys()
    assert sum(not np.array_equal(light_rows[d], rand_rows[d]) for d in light_rows) > len(light_rows) // 2
    assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["finetune_view_policy"] == "randaugment"
    with pytest.raises(ConfigError, match="--finetune-view-policy must be one of light, randaugment, trivialaugment"):
        tiny_config(tmp_path, tiny_weights, finetune_view_policy="autoaugment")


def _spec(policy: str) -> str:
    import hashlib

    from transferkit.data.transforms import view_spec

    return hashlib.sha256(view_spec(policy).encode()).hexdigest()[:12]


def test_views_are_cached_once_the_same_in_every_run_and_read_by_a_rerun(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, feature_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib

    from transferkit.data.transforms import view_spec

    # Three epochs read the plain activations, then view 1, then view 2.
    options = {"finetune_on": "activations", "finetune_views": 2, "finetune.epochs": 3, "finetune.patience": 3,
               "frozen.epochs": 0}
    first = train(image_folder, tiny_config(tmp_path / "first", tiny_weights, **options))
    trained = sum(first.counts["train"].values())
    spec = hashlib.sha256(view_spec("light").encode()).hexdigest()[:12]
    plain = next(p for p in feature_cache.iterdir() if "-after-" in p.name and "-view" not in p.name)
    folders = sorted(p for p in feature_cache.iterdir() if "-view" in p.name)
    assert [p.name for p in folders] == [f"{plain.name}-view{k}-{spec}" for k in (1, 2)]
    plain_rows, view_rows = cached_rows(plain), [cached_rows(folder) for folder in folders]
    assert all(len(rows) == trained for rows in view_rows), "views of the training images only"
    for digest, one in view_rows[0].items():
        assert not np.array_equal(one, plain_rows[digest]) and not np.array_equal(one, view_rows[1][digest])

    shards = sorted(feature_cache.rglob("*.npz"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transferkit"):
        train(image_folder, tiny_config(tmp_path / "second", tiny_weights, **options))
    for kind in ("activations (view 1)", "activations (view 2)"):
        assert f"{kind}: {trained} images, {trained} from the cache" in caplog.text
    assert sorted(feature_cache.rglob("*.npz")) == shards, "a warm rerun computes and stores nothing"

    elsewhere = tmp_path / "other-cache"
    train(image_folder, tiny_config(tmp_path / "third", tiny_weights, **options, cache_dir=str(elsewhere)))
    for folder, rows in zip(folders, view_rows):
        again = cached_rows(elsewhere / folder.name)
        assert again.keys() == rows.keys()
        assert all(np.array_equal(again[digest], row) for digest, row in rows.items()), "the same view in every run"


def test_a_view_no_epoch_reads_is_not_computed(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, feature_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"finetune_on": "activations", "finetune_views": 2, "finetune.epochs": 2, "finetune.patience": 2,
               "frozen.epochs": 0}
    with caplog.at_level(logging.INFO, logger="transferkit"):
        train(image_folder, tiny_config(tmp_path / "run", tiny_weights, **options))
    views = sorted(p.name for p in feature_cache.iterdir() if "-view" in p.name)
    assert len(views) == 1 and "-view1-" in views[0], "two epochs read the plain activations and view 1"
    assert "--finetune-views 2: 2 fine-tuning epochs read 1 of them; only those are computed" in caplog.text


def test_each_fine_tuning_epoch_trains_on_the_next_view(image_folder: Path, tmp_path: Path, tiny_weights: Path) -> None:
    from transferkit.training.trainer_options import trainer_options
    from transferkit.data.folders import discover
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.run.folder import RunFolder
    from transferkit.cache import activations
    from transferkit.training.lightning import AboveBoundary, FineTuning, ImageClassifier, fit_with_lightning
    from transferkit.training.phase import EpochSampler

    config = tiny_config(tmp_path / "run", tiny_weights, **{
        "finetune_on": "activations", "finetune_views": 2, "finetune.epochs": 4, "finetune.patience": 4,
        "finetune.augment": "none"})
    index = discover(image_folder, seed=0)
    model = create_classifier(config.model, 2, 64)
    preprocessing = resolve_preprocessing(model, 64)
    boundary = activations.finetune_boundary(model, 2, config, preprocessing, index)
    run = activations.ActivationPass.of(config)
    cached, _ = activations.boundary_activations(model, boundary, index, preprocessing, run)
    views = [cached["train"], *activations.training_views(model, boundary, index, preprocessing, 2, run)]
    where = {row.numpy().tobytes(): (view, i) for view, rows in enumerate(views) for i, row in enumerate(rows)}
    assert len(where) == 3 * len(cached["train"]), "every view of every image differs"
    received: dict[int, list[tuple[int, int]]] = {}

    class Recording(FineTuning):
        def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:  # type: ignore[no-untyped-def]
            super().on_train_batch_start(trainer, module, batch, batch_index)
            received.setdefault(trainer.current_epoch, []).extend(where[row.numpy().tobytes()] for row in batch[0])

    targets = index.targets("train")
    val = activations.ViewDataset([cached["val"]], torch.tensor(index.targets("val")))
    fit_with_lightning(
        ImageClassifier(model, torch.nn.CrossEntropyLoss(), Recording("finetune", config.finetune, 2, "frozen"),
                        AboveBoundary(model, boundary, "none")),
        activations.training_loader(views, targets, EpochSampler(len(targets), seed=0), 16),
        torch.utils.data.DataLoader(val, 16), folder=RunFolder(tmp_path / "run"), name="finetune", resume_from=None,
        trainer_options=trainer_options("cpu", "1", 1, "auto", "32-true"), progress_bar=False,
    )
    assert sorted(received) == [0, 1, 2, 3]
    for epoch, rows in received.items():
        assert {view for view, _ in rows} == {epoch % 3}, f"epoch {epoch} reads view {epoch % 3} alone"
        assert sorted(i for _, i in rows) == list(range(len(targets))), "each training image once"


def test_the_activation_budget_counts_the_views(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transferkit.data.folders import discover
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.cache.activations import finetune_boundary

    index = discover(image_folder, seed=0)
    images, trained = sum(len(items) for items in index.splits.values()), len(index.splits["train"])
    model = create_classifier(ModelConfig(name="test_efficientnet", weights="none"), 2, 64)
    preprocessing = resolve_preprocessing(model, 64)
    row = activation_bytes(model, boundary_index(model, 2), preprocessing["input_size"])
    budget = (images + trained) * row / 1e9  # room for one view, not two

    def boundary(views: int) -> int | None:
        options = {"finetune_on": "auto", "finetune_views": views, "finetune.epochs": 3, "activation_cache_gb": budget}
        return finetune_boundary(model, 2, tiny_config(tmp_path, tiny_weights, **options), preprocessing, index)

    assert boundary(1) is not None
    with caplog.at_level(logging.INFO, logger="transferkit"):
        assert boundary(2) is None
    assert (f"fine-tuning on images: the activations with 2 views of each training image would take 0.0 GB, "
            f"over --activation-cache-gb {budget:g}; --finetune-views 2 is not used") in caplog.text


def test_views_need_fine_tuning_on_activations(tmp_path: Path, tiny_weights: Path) -> None:
    with pytest.raises(ConfigError, match=r"--finetune-views 2 needs fine-tuning on activations; drop --finetune-on images"):
        tiny_config(tmp_path, tiny_weights, finetune_on="images", finetune_views=2)
    with pytest.raises(ConfigError, match=r"--finetune-views must be 0 or more, got -1"):
        tiny_config(tmp_path, tiny_weights, finetune_views=-1)
