from __future__ import annotations

import csv
import gc
import hashlib
import logging
import os
import pickle
import shutil
import stat
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from transferkit.cache.store import COMPACT_AT
from transferkit._io import write_text
from transferkit.cache.store import FeatureCache
from transferkit.inference.predictor import run_forward
from transferkit import train


def frozen_run(data: Path, output: Path, weights: Path, **overrides: object) -> dict:
    config = tiny_config(output, weights, **{"frozen.epochs": 3, "finetune.epochs": 0, **overrides})
    return train(data, config).metrics


def two_phase_run(data: Path, output: Path, weights: Path, **overrides: object) -> dict:
    config = tiny_config(output, weights, **{"frozen.epochs": 3, "finetune.epochs": 2, "finetune.patience": 2, **overrides})
    return train(data, config).metrics


def val_losses(run_dir: Path) -> list[str]:
    with (run_dir / "history.csv").open() as handle:
        return [row["val_loss"] for row in csv.DictReader(handle)]


@pytest.mark.parametrize("finetune_on", ["auto", "images"])
def test_a_second_run_reads_every_feature_from_the_cache_and_trains_identically(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, feature_cache: Path, finetune_on: str
) -> None:
    first = two_phase_run(image_folder, tmp_path / "first", tiny_weights, finetune_on=finetune_on)
    second = two_phase_run(image_folder, tmp_path / "second", tiny_weights, finetune_on=finetune_on)
    assert first["features"]["from_cache"] == 0 and first["features"]["images"] == 50
    assert second["features"]["from_cache"] == 50
    # Computing features (an ONNX export) on the first run must leave nothing behind that the
    # fine-tuning phase would see: both runs train identically, epoch for epoch.
    assert val_losses(tmp_path / "first") == val_losses(tmp_path / "second")
    assert len(val_losses(tmp_path / "first")) == 5
    # On activations, the activations' folder beside the backbone's features.
    folders = [folder for folder in feature_cache.iterdir() if folder.is_dir()]
    assert len(folders) == (2 if finetune_on == "auto" else 1)
    assert all(len(list(folder.glob("*.npz"))) == 1 for folder in folders), "nothing new to store the second time"


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


def first_byte_features(paths: list[str], digests: dict[str, bytes]) -> np.ndarray:
    """A stand-in for the backbone that, like the real pass, reads each file once and records its digest."""
    rows = []
    for path in paths:
        content = Path(path).read_bytes()
        digests[path] = hashlib.sha256(content).digest()
        rows.append([float(content[-1])] * 4)
    return np.array(rows, np.float32)


def numbered_files(folder: Path, count: int, start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        paths.append(folder / f"{i}.bin")
        paths[-1].write_bytes(f"image {i}".encode() + bytes([i % 256]))
    return [str(p) for p in paths]


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "transferkit.cache" and r.levelno >= logging.WARNING]


def test_an_unreadable_shard_is_moved_aside_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = FeatureCache(tmp_path / "features" / "backbone")
    paths = numbered_files(tmp_path / "images", 3)
    features, stats = cache.features(paths, first_byte_features)
    assert stats.from_cache == 0 and features[:, 0].tolist() == [0.0, 1.0, 2.0]
    (cache.folder / "broken.npz").write_bytes(b"PK\x03\x04 not a whole zip file")
    with caplog.at_level(logging.WARNING, logger="transferkit.cache"):
        again, stats = cache.features(paths, first_byte_features)
        assert stats.from_cache == 3
        np.testing.assert_array_equal(again, features)
        assert len(warnings_from(caplog)) == 1
        assert "ignoring unusable shard" in caplog.text and "broken.npz" in caplog.text
        caplog.clear()
        _, stats = cache.features(paths, first_byte_features)
    assert stats.from_cache == 3 and warnings_from(caplog) == [], "the next run does not trip on it again"
    assert "broken.npz" not in {p.name for p in cache.folder.glob("*.npz")}


def test_every_digest_matches_again_including_those_ending_in_a_zero_byte(tmp_path: Path) -> None:
    paths = []
    for i in range(2000):  # one SHA-256 in 256 ends in a zero byte
        content = f"image {i}".encode()
        if hashlib.sha256(content).digest()[-1] == 0 or len(paths) < 3:
            path = tmp_path / f"{i}.bin"
            path.write_bytes(content)
            paths.append(str(path))
    assert any(hashlib.sha256(Path(p).read_bytes()).digest()[-1] == 0 for p in paths)
    cache = FeatureCache(tmp_path / "features")
    cache.features(paths, first_byte_features)
    _, stats = cache.features(paths, first_byte_features)
    assert stats.from_cache == len(paths)


MEAN_COLOUR = {"input_size": (3, 8, 8), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "crop_pct": 1.0,
               "interpolation": "bilinear"}


def mean_colour(paths: list[str], digests: dict[str, bytes]) -> np.ndarray:
    """The real input pipeline with a forward that is each image's mean colour."""
    return run_forward(lambda batch: batch.mean(axis=(2, 3)), paths, MEAN_COLOUR, num_workers=1, digests=digests)


def test_a_file_rewritten_during_the_feature_pass_never_poisons_the_cache(tmp_path: Path) -> None:
    old, new = (200, 30, 30), (30, 30, 200)
    photo, copy = tmp_path / "photo.png", tmp_path / "copy.png"
    Image.new("RGB", (16, 16), old).save(photo)
    shutil.copy(photo, copy)
    old_content = photo.read_bytes()
    cache = FeatureCache(tmp_path / "features")

    def rewrite_then_compute(paths: list[str], digests: dict[str, bytes]) -> np.ndarray:
        # Another program saves over the photo after it was hashed, before it is decoded.
        Image.new("RGB", (16, 16), new).save(photo)
        return mean_colour(paths, digests)

    first, _ = cache.features([str(photo), str(copy)], rewrite_then_compute)
    np.testing.assert_allclose(first[0], np.array(new) / 255, atol=1e-3, err_msg="the photo as decoded")
    np.testing.assert_allclose(first[1], np.array(old) / 255, atol=1e-3, err_msg="its old twin, unchanged")

    photo.write_bytes(old_content)
    again, stats = cache.features([str(photo), str(copy)], mean_colour)
    np.testing.assert_allclose(again, [np.array(old) / 255] * 2, atol=1e-3)
    assert stats.from_cache == 2
    Image.new("RGB", (16, 16), new).save(photo)
    third, stats = cache.features([str(photo)], mean_colour)
    assert stats.from_cache == 1, "the rewritten content was stored under its own digest"
    np.testing.assert_allclose(third[0], np.array(new) / 255, atol=1e-3)


def test_runs_that_store_the_same_images_twice_are_merged_into_one_shard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "features"
    paths = numbered_files(tmp_path / "images", 3)

    def alongside_another_cold_run(missing: list[str], digests: dict[str, bytes]) -> np.ndarray:
        # A second run on the same images finds the cache as empty as this one did.
        FeatureCache(folder).features(paths, first_byte_features)
        return first_byte_features(missing, digests)

    FeatureCache(folder).features(paths, alongside_another_cold_run)
    assert len(list(folder.glob("*.npz"))) == 2, "both runs stored the same three images"
    for start in range(3, 2 + COMPACT_AT):  # one shard more than a folder may hold
        FeatureCache(folder).features(numbered_files(tmp_path / "images", 1, start), first_byte_features)
    assert len(list(folder.glob("*.npz"))) == COMPACT_AT + 1
    everything = numbered_files(tmp_path / "images", 2 + COMPACT_AT)
    with caplog.at_level(logging.INFO, logger="transferkit.cache"):
        merged, stats = FeatureCache(folder).features(everything, first_byte_features)
    assert stats.from_cache == len(everything) and merged[:, 0].tolist() == [float(i) for i in range(len(everything))]
    shards = list(folder.glob("*.npz"))
    assert len(shards) == 1 and "merged" in caplog.text
    with np.load(shards[0]) as data:
        assert len(data["digests"]) == len(everything), "each image once"
    again, stats = FeatureCache(folder).features(everything, first_byte_features)
    assert stats.from_cache == len(everything)
    np.testing.assert_array_equal(again, merged)


def test_cache_files_follow_the_umask_so_a_team_can_share_them(tmp_path: Path) -> None:
    previous = os.umask(0o002)
    try:
        cache = FeatureCache(tmp_path / "features")
        cache.features(numbered_files(tmp_path / "images", 2), first_byte_features)
        write_text(tmp_path / "notes.txt", "shared")
    finally:
        os.umask(previous)
    (shard,) = cache.folder.glob("*.npz")
    assert stat.S_IMODE(shard.stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "notes.txt").stat().st_mode) == 0o664


def unwritable_cache(tmp_path: Path) -> Path:
    """A cache folder below a regular file: no user, root included, can create it."""
    (tmp_path / "not-a-folder").write_text("a file where the cache folder's parent should be")
    return tmp_path / "not-a-folder" / "features"


def test_an_unwritable_cache_costs_time_never_the_features(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = FeatureCache(unwritable_cache(tmp_path) / "backbone")
    paths = numbered_files(tmp_path / "images", 3)
    with caplog.at_level(logging.WARNING, logger="transferkit.cache"):
        for _ in range(2):
            features, stats = cache.features(paths, first_byte_features)
            assert features[:, 0].tolist() == [0.0, 1.0, 2.0] and stats.from_cache == 0
    (warning,) = warnings_from(caplog)
    assert "cannot store features in" in warning and "writable folder" in warning


def test_training_goes_on_with_an_unwritable_cache_and_learns_the_same(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="transferkit.cache"):
        metrics = frozen_run(image_folder, tmp_path / "uncached", tiny_weights, cache_dir=str(unwritable_cache(tmp_path)))
    assert metrics["features"]["images"] == 50 and metrics["features"]["from_cache"] == 0
    assert len(warnings_from(caplog)) == 1
    frozen_run(image_folder, tmp_path / "cached", tiny_weights)
    assert val_losses(tmp_path / "uncached") == val_losses(tmp_path / "cached"), "the same features either way"


def test_a_pass_stopped_midway_keeps_every_chunk_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("transferkit.cache.store.CHUNK", 10)
    paths = numbered_files(tmp_path / "images", 35)
    chunks: list[int] = []

    def stopped_in_the_third_chunk(missing: list[str], digests: dict[str, bytes]) -> np.ndarray:
        if len(chunks) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises mid-pass
        chunks.append(len(missing))
        return first_byte_features(missing, digests)

    cache = FeatureCache(tmp_path / "features")
    with pytest.raises(KeyboardInterrupt):
        cache.features(paths, stopped_in_the_third_chunk)
    computed: list[str] = []

    def resumed(missing: list[str], digests: dict[str, bytes]) -> np.ndarray:
        computed.extend(missing)
        return first_byte_features(missing, digests)

    features, stats = cache.features(paths, resumed)
    assert stats.from_cache == 20 and len(computed) == 15, "the two finished chunks are not computed again"
    assert np.array_equal(features, first_byte_features(paths, {}))


def wide_features(paths: list[str], digests: dict[str, bytes]) -> np.ndarray:
    """64 KB a row, like boundary activations: each file's last byte, repeated."""
    return np.repeat(first_byte_features(paths, digests)[:, :1], 16384, axis=1)


def test_cached_rows_are_read_from_the_cache_files_never_all_held_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("transferkit.cache.store.CHUNK", 64)
    paths = numbered_files(tmp_path / "images", 1024)
    expected = wide_features(paths, {})
    cache = FeatureCache(tmp_path / "features")
    tracemalloc.start()
    try:
        cold, _ = cache.rows(paths, wide_features)
        cold_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        warm, stats = cache.rows(paths, wide_features)
        warm_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 64 MB of rows in all: a pass holds one chunk of them (4 MB) while it stores it, a
    # rerun none; hashing the files takes about 5 MB of buffers either way.
    assert cold_peak < expected.nbytes / 4 and warm_peak < expected.nbytes / 4, (cold_peak, warm_peak)
    assert stats.from_cache == 1024 and len(list(cache.folder.glob("*.npz"))) == 16
    for rows in (cold, warm):
        assert rows.shape == expected.shape
        np.testing.assert_array_equal(rows.numpy(), expected)
        np.testing.assert_array_equal(rows[np.array([300, 5, 300, 6])].numpy(), expected[[300, 5, 300, 6]])
        np.testing.assert_array_equal(rows[7].numpy(), expected[7])
        np.testing.assert_array_equal(rows.subset(100, 200)[50:60].numpy(), expected[150:160])


def test_cached_rows_outlive_their_shards_being_merged_away_and_travel_to_another_process(tmp_path: Path) -> None:
    paths = numbered_files(tmp_path / "images", 40)
    expected = wide_features(paths, {})
    cache = FeatureCache(tmp_path / "features")
    rows, _ = cache.rows(paths, wide_features)
    sent = pickle.dumps(rows.subset(10, 20))  # as a spawned worker receives them: by the shard's name
    np.testing.assert_array_equal(pickle.loads(sent).numpy(), expected[10:20])
    # What a run compacting the folder at the same time does to the shard this run reads.
    for shard in cache.folder.glob("*.npz"):
        shard.unlink()
    np.testing.assert_array_equal(rows.numpy(), expected)


def open_files(folder: Path) -> int:
    """Files of ``folder`` this process has open."""
    count = 0
    for entry in Path("/proc/self/fd").iterdir():
        try:
            count += Path(os.readlink(entry)).parent == folder
        except OSError:  # closed while listed
            pass
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_run_keeps_open_only_the_shards_it_reads_and_closes_them_with_its_rows(tmp_path: Path) -> None:
    folder = tmp_path / "features"
    for other_dataset in range(6):  # a cache folder is shared by every dataset seen with this backbone
        FeatureCache(folder).rows(numbered_files(tmp_path / f"other{other_dataset}", 3, 100 + 3 * other_dataset),
                                  wide_features)
    paths = numbered_files(tmp_path / "images", 5)
    FeatureCache(folder).rows(paths, wide_features)
    assert open_files(folder) == 0
    rows, stats = FeatureCache(folder).rows(paths, wide_features)
    assert stats.from_cache == 5 and open_files(folder) == 1, "one shard of seven holds this dataset's rows"
    view = rows.subset(1, 3)
    del rows
    gc.collect()
    np.testing.assert_array_equal(view.numpy(), wide_features(paths[1:3], {}))
    del view
    gc.collect()
    assert open_files(folder) == 0


def test_rows_of_another_shape_in_the_cache_are_moved_aside_and_computed_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = FeatureCache(tmp_path / "features")
    cache.rows(numbered_files(tmp_path / "images", 2), first_byte_features)
    paths = numbered_files(tmp_path / "images", 3)
    with caplog.at_level(logging.WARNING, logger="transferkit.cache"):
        rows, _ = FeatureCache(tmp_path / "features").rows(paths, wide_features)
    np.testing.assert_array_equal(rows.numpy(), wide_features(paths, {}))
    (warning,) = warnings_from(caplog)
    assert "rows of shape (4,), where this model gives (16384,)" in warning and "moved it aside" in warning
    again, stats = FeatureCache(tmp_path / "features", row_shape=(16384,)).rows(paths, wide_features)
    assert stats.from_cache == 3
    np.testing.assert_array_equal(again.numpy(), wide_features(paths, {}))
