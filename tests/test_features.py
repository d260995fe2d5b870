from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_options
from transferkit.cli import build_train_config
from transferkit.features import FeatureCache
from transferkit.training import train


def frozen_run(data: Path, output: Path, weights: Path, **overrides: object) -> dict:
    options = tiny_options(data, output, weights, **{"frozen.epochs": 3, "finetune.epochs": 0, **overrides})
    return train(build_train_config(options)).metrics


def two_phase_run(data: Path, output: Path, weights: Path) -> dict:
    options = tiny_options(data, output, weights, **{"frozen.epochs": 3, "finetune.epochs": 2, "finetune.patience": 2})
    return train(build_train_config(options)).metrics


def val_losses(run_dir: Path) -> list[str]:
    with (run_dir / "history.csv").open() as handle:
        return [row["val_loss"] for row in csv.DictReader(handle)]


def test_a_second_run_reads_every_feature_from_the_cache_and_trains_identically(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, feature_cache: Path
) -> None:
    first = two_phase_run(image_folder, tmp_path / "first", tiny_weights)
    second = two_phase_run(image_folder, tmp_path / "second", tiny_weights)
    assert first["features"]["from_cache"] == 0 and first["features"]["images"] == 50
    assert second["features"]["from_cache"] == 50
    # Computing features (an ONNX export) on the first run must leave nothing behind that the
    # fine-tuning phase would see: both runs train identically, epoch for epoch.
    assert val_losses(tmp_path / "first") == val_losses(tmp_path / "second")
    assert len(val_losses(tmp_path / "first")) == 5
    assert len(list(feature_cache.glob("*/*.npz"))) == 1, "nothing new to store the second time"


def test_features_follow_file_content_not_names(
    image_folder: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    frozen_run(image_folder, tmp_path / "first", tiny_weights)
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    for path in sorted(moved.rglob("*.jpg")):
        path.rename(path.with_name("renamed_" + path.name))
    edited = sorted((moved / "red").glob("*.jpg"))[0]
    Image.new("RGB", (40, 32), (200, 30, 30)).save(edited)

    metrics = frozen_run(moved, tmp_path / "second", tiny_weights)
    assert metrics["features"]["from_cache"] == 49, "renamed files hit, the edited one is computed again"
    other_size = frozen_run(moved, tmp_path / "third", tiny_weights, **{"data.image_size": 72})
    assert other_size["features"]["from_cache"] == 0, "another input size is another backbone key"


def test_an_unreadable_shard_is_skipped_with_a_warning(
    tmp_path: Path, tiny_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = FeatureCache(tmp_path / "features" / "backbone")
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(images[-1])
    paths = [str(p) for p in images]
    computed = {"calls": 0}

    def compute(missing: list[str]) -> np.ndarray:
        computed["calls"] += 1
        return np.array([[float(Path(p).stem)] * 4 for p in missing], np.float32)

    features, stats = cache.features(paths, compute)
    assert stats.from_cache == 0 and features[:, 0].tolist() == [0.0, 1.0, 2.0]
    (cache.folder / "broken.npz").write_bytes(b"PK\x03\x04 not a whole zip file")
    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        again, stats = cache.features(paths, compute)
    assert stats.from_cache == 3 and computed["calls"] == 1
    np.testing.assert_array_equal(again, features)
    assert "ignoring unreadable shard" in caplog.text and "broken.npz" in caplog.text


def test_every_digest_matches_again_including_those_ending_in_a_zero_byte(tmp_path: Path) -> None:
    import hashlib

    paths = []
    for i in range(2000):  # one SHA-256 in 256 ends in a zero byte
        content = f"image {i}".encode()
        if hashlib.sha256(content).digest()[-1] == 0 or len(paths) < 3:
            path = tmp_path / f"{i}.bin"
            path.write_bytes(content)
            paths.append(str(path))
    assert any(hashlib.sha256(Path(p).read_bytes()).digest()[-1] == 0 for p in paths)
    cache = FeatureCache(tmp_path / "features")

    def compute(missing: list[str]) -> np.ndarray:
        return np.ones((len(missing), 2), np.float32)

    cache.features(paths, compute)
    _, stats = cache.features(paths, compute)
    assert stats.from_cache == len(paths)
