"""Nothing read from the feature cache is trusted: a shard that is no file, lies in a header, has
damaged bytes or holds another model's rows is moved aside with one warning, and its rows are
computed again, equal to a clean run's; no hang, no traceback, no wrong number."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conftest import TINY_MODEL, make_folder, tiny_config
from transferkit import train
from test_cache_store import first_byte_features as last_byte  # the stand-in backbone test_cache_store uses
from transferkit.cache.store import FeatureCache
from transferkit.cache.passes import cached_pooled_features


def npy(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    """``array`` as a ``.npy`` file whose header may claim another ``shape``."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": array.shape if shape is None else shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    buffer.write(np.ascontiguousarray(array).tobytes())
    return buffer.getvalue()


def write_shard(path: Path, digests: np.ndarray, rows: np.ndarray, fingerprint: str,
                digests_shape: tuple[int, ...] | None = None) -> None:
    """A shard made with zipfile alone, as np.savez writes one, with transferkit's zip comment."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("digests.npy", npy(digests, digests_shape))
        archive.writestr("features.npy", npy(rows))
        archive.comment = json.dumps({"fingerprint": fingerprint}).encode()


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as stored:
        return stored["digests"], stored["features"]


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "transferkit.cache" and r.levelno >= logging.WARNING]




def numbered_files(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i}.bin").write_bytes(f"image {i}".encode() + bytes([i % 256]))
    return [str(folder / f"{i}.bin") for i in range(count)]


LOOKUP = """
import json, logging, sys
import numpy as np
from pathlib import Path
from transferkit.cache.store import FeatureCache
sys.path.insert(0, {tests!r})
from test_cache_store import first_byte_features as last_byte
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
paths = {paths!r}
features, stats = FeatureCache(Path({folder!r})).features(paths, last_byte)
print(json.dumps({{"features": features.tolist(), "from_cache": stats.from_cache}}))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="FIFOs and /dev/zero")
def test_a_fifo_or_a_link_to_a_device_named_like_a_shard_is_moved_aside_unread(tmp_path: Path) -> None:
    paths = numbered_files(tmp_path / "images", 3)
    cache = FeatureCache(tmp_path / "features")
    expected, _ = cache.features(paths, last_byte)
    os.mkfifo(cache.folder / "fifo.npz")
    (cache.folder / "zero.npz").symlink_to("/dev/zero")
    # In a process of its own, bounded: reading /dev/zero fills memory, a FIFO blocks its reader forever.
    script = LOOKUP.format(tests=str(Path(__file__).parent), paths=paths, folder=str(cache.folder))

    def bounded_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=bounded_memory)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["from_cache"] == 3 and np.array_equal(result["features"], expected)
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2, warnings
    assert any("fifo.npz" in w and "a FIFO" in w for w in warnings)
    assert any("zero.npz" in w and "a character device" in w for w in warnings)
    assert sorted(p.name for p in cache.folder.iterdir()) == [
        next(cache.folder.glob("2*.npz")).name, "fifo.npz.unreadable", "zero.npz.unreadable"]


def test_a_digests_header_claiming_more_than_the_file_holds_allocates_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = numbered_files(tmp_path / "images", 3)
    cache = FeatureCache(tmp_path / "features")
    expected, _ = cache.features(paths, last_byte)
    (shard,) = cache.folder.glob("*.npz")
    digests, rows = read_shard(shard)
    # 300 bytes that claim 320 TB of digests: NumPy would allocate them before reading a byte.
    write_shard(shard, digests, rows, cache.folder.name, digests_shape=(10**13, 32))
    assert shard.stat().st_size < 1000
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        for _ in range(2):  # and the next run does not trip on it either
            again, _ = FeatureCache(cache.folder).features(paths, last_byte)
            np.testing.assert_array_equal(again, expected)
    (warning,) = warnings_from(caplog)
    assert "digests of shape (10000000000000, 32)" in warning and "moved it aside" in warning


def test_shards_written_before_shards_had_fingerprints_are_moved_aside_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = numbered_files(tmp_path / "images", 3)
    folder = tmp_path / "features"
    folder.mkdir()
    for i, path in enumerate(paths):  # as np.savez wrote them: no zip comment
        digests: dict[str, bytes] = {}
        rows = last_byte([path], digests) + 1  # rows no model of today's would give
        np.savez(folder / f"old-{i}.npz", digests=np.frombuffer(digests[path], np.uint8)[None], features=rows)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        features, stats = FeatureCache(folder).features(paths, last_byte)
    np.testing.assert_array_equal(features, last_byte(paths, {}))
    assert stats.from_cache == 0
    (warning,) = warnings_from(caplog)
    assert "recorded no fingerprint" in warning and "moved it aside to *.unreadable" in warning
    assert sorted(p.name for p in folder.glob("*.unreadable")) == [f"old-{i}.npz.unreadable" for i in range(3)]


def test_temporary_shards_left_by_a_killed_writer_are_removed_and_a_live_writers_kept(tmp_path: Path) -> None:
    paths = numbered_files(tmp_path / "images", 3)
    cache = FeatureCache(tmp_path / "features")
    cache.features(paths, last_byte)
    killed = cache.folder / ".20261201-120000-0123abcd.npz.a1b2c3d4e5f6.tmp"
    live = cache.folder / ".20261207-120000-4567abcd.npz.0a1b2c3d4e5f.tmp"
    for tmp in (killed, live):
        tmp.write_bytes(b"PK\x03\x04" + bytes(4096))
    two_hours_ago = time.time() - 7200
    os.utime(killed, (two_hours_ago, two_hours_ago))
    _, stats = FeatureCache(cache.folder).features(paths, last_byte)
    assert stats.from_cache == 3
    assert not killed.exists(), "a killed merge's temporary file is removed"
    assert live.exists(), "one a train is writing now is left alone"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_shards_past_the_open_file_limit_are_still_merged_into_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib

    paths = numbered_files(tmp_path / "images", 300)
    cache = FeatureCache(tmp_path / "features")
    for path in paths:  # what 300 runs that each computed one image leave
        cache.store([path], last_byte([path], {}), {path: hashlib.sha256(Path(path).read_bytes()).digest()})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + 64  # room for this process, not for every shard at once
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with caplog.at_level(logging.INFO, logger="transferkit"):
            features, stats = FeatureCache(cache.folder).features(paths, last_byte)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    np.testing.assert_array_equal(features, last_byte(paths, {}))
    assert stats.from_cache == 300 and warnings_from(caplog) == []
    assert len(list(cache.folder.glob("*.npz"))) == 1 and "merged 300 shards" in caplog.text


# --- the fuzz: a real shard of a real (tiny) model, mutated 200 ways -----------------------------

MARKERS = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"\x93NUMPY")


def mutated(clean: bytes, seed: int) -> bytes:
    """One seeded mutation of a shard's bytes: its headers' fields, its rows, its length, its
    arrays' shapes and types, or its fingerprint."""
    random = np.random.default_rng(seed)
    data = bytearray(clean)
    headers = [at for marker in MARKERS for at in range(len(data)) if data.startswith(marker, at)]
    kind = seed % 8
    if kind in (0, 1, 2):  # a few bytes of a zip or .npy header, set at random
        start = headers[random.integers(len(headers))]
        for _ in range(random.integers(1, 4)):
            data[min(start + int(random.integers(4, 64)), len(data) - 1)] = int(random.integers(256))
    elif kind == 3:  # a few bytes anywhere, rows included
        for _ in range(random.integers(1, 4)):
            data[random.integers(len(data))] = int(random.integers(256))
    elif kind == 4:  # cut short, or grown with zeros as a sparse file reads
        size = int(random.integers(len(data) * 2))
        data = data[:size] + bytes(max(0, size - len(data)))
    elif kind == 5:  # a shape that lies, of the same length where it can
        shape_at = [at for at in range(len(data)) if data.startswith(b"'shape': (", at)]
        at = shape_at[random.integers(len(shape_at))] + len(b"'shape': (")
        end = data.index(b")", at)
        lie = random.choice(["1000000000000", "0", "1", "3", "31", "33", "-1", "7", "1279", "2, 2", "1, 1, 1, 1"])
        numbers = data[at:end].split(b",")
        numbers[random.integers(len(numbers))] = f" {lie}".encode() if random.random() < 0.5 else lie.encode()
        data[at:end] = b",".join(numbers).strip()
    elif kind == 6:  # another type
        descr_at = [at for at in range(len(data)) if data.startswith(b"'descr': '", at)]
        at = descr_at[random.integers(len(descr_at))] + len(b"'descr': '")
        end = data.index(b"'", at)
        data[at:end] = random.choice([b"<f2", b"<f8", b"<i4", b"|u1", b"|i1", b">f4", b"<c8", b"|O", b"<U8"])
    else:  # the zip comment: another model's fingerprint, or none
        end = data.rindex(b"PK\x05\x06")
        comment = random.choice([b"", b'{"fingerprint": "0123456789abcdef"}', b"{", bytes(random.integers(0, 256, 40))])
        data = data[: end + 20] + len(comment).to_bytes(2, "little") + comment
    return bytes(data)


class TimeLimit(Exception):
    pass


def within(seconds: int, call):  # type: ignore[no-untyped-def]
    """``call()``, or TimeLimit after ``seconds``: an alarm interrupts even a blocking open or read."""
    def expire(signum: int, frame: object) -> None:
        raise TimeLimit(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="time limits by SIGALRM")
def test_200_mutations_of_a_real_shard_give_the_clean_features_or_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transferkit.data.loaders import resolve_preprocessing

    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, pretrained=False, num_classes=2).eval()
    preprocessing = resolve_preprocessing(model, 32)
    paths = sorted(str(p) for p in make_folder(tmp_path / "data", per_class=4).rglob("*.jpg"))
    cache_dir = tmp_path / "cache"
    expected, _ = cached_pooled_features(model, paths, preprocessing, "avg", "cpu", cache_dir=cache_dir, num_workers=0)
    (folder,) = cache_dir.iterdir()
    (shard,) = folder.glob("*.npz")
    clean = shard.read_bytes()
    outcomes = {"clean": 0, "moved aside": 0}
    for seed in range(200):
        # A cache of its own each seed: a process warns once for each shard, and for some troubles
        # once for each folder.
        seed_cache = tmp_path / f"cache-{seed:03d}"
        (seed_cache / folder.name).mkdir(parents=True)
        (seed_cache / folder.name / shard.name).write_bytes(mutated(clean, seed))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="transferkit"):
            features, stats = within(20, lambda: cached_pooled_features(
                model, paths, preprocessing, "avg", "cpu", cache_dir=seed_cache, num_workers=0))
        warnings = warnings_from(caplog)
        assert np.array_equal(features, expected), f"seed {seed}: wrong features"
        assert len(warnings) <= 1, (seed, warnings)
        assert stats.from_cache == len(paths) or len(warnings) == 1, f"seed {seed}: recomputed without a word"
        outcomes["moved aside" if warnings else "clean"] += 1
        if warnings:
            assert "moved it aside" in warnings[0], seed
            assert (seed_cache / folder.name / f"{shard.name}.unreadable").exists(), seed
        shutil.rmtree(seed_cache)
    assert outcomes["moved aside"] > 150, outcomes


# --- whole runs on a lying cache --------------------------------------------------------------


def history(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "history.csv").open() as handle:
        return [{key: row[key] for key in ("phase", "epoch", "train_loss", "val_loss", "val_acc")}
                for row in csv.DictReader(handle)]


def test_a_cached_shard_whose_rows_are_not_what_the_model_gives_is_recomputed_and_training_is_unchanged(
    tmp_path: Path, tiny_weights: Path, feature_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    options = {"finetune_on": "activations", "frozen.epochs": 2, "finetune.epochs": 2, "finetune.patience": 2}
    clean = train(data, tiny_config(tmp_path / "clean", tiny_weights, **options)).metrics
    (activations,) = [p for p in feature_cache.iterdir() if "-after-" in p.name]
    (shard,) = activations.glob("*.npz")
    digests, maps = read_shard(shard)
    shard.unlink()
    count, channels, height, width = maps.shape
    # Each an internally sound shard with this folder's fingerprint, whose rows this model never gives:
    # a map a column narrower is read silently, a channel fewer fails in the top's first layer.
    for name, rows in {"narrower": maps.reshape(-1)[: count * channels * height * (width - 1)]
                       .reshape(count, channels, height, width - 1), "a channel fewer": maps[:, 1:]}.items():
        write_shard(activations / f"{name}.npz", digests, rows, activations.name)  # a name of its own: one warning each
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="transferkit"):
            lied = train(data, tiny_config(tmp_path / name, tiny_weights, **options)).metrics
        assert history(tmp_path / name) == history(tmp_path / "clean"), name
        assert lied["val"] == clean["val"], name
        (warning,) = warnings_from(caplog)
        assert f"rows of shape {rows.shape[1:]}, where this model gives {maps.shape[1:]}" in warning, warning
        for other in activations.iterdir():  # the next lie is the only shard again
            other.unlink()


def test_a_pooled_shard_of_another_width_or_input_size_is_recomputed_and_training_is_unchanged(
    tmp_path: Path, tiny_weights: Path, feature_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    frozen = {"frozen.epochs": 2, "finetune.epochs": 0}
    train(data, tiny_config(tmp_path / "at72", tiny_weights, **frozen, **{"data.image_size": 72}))
    (at72,) = feature_cache.iterdir()
    (shard,) = at72.glob("*.npz")
    digests, features = read_shard(shard)
    write_shard(shard, digests, features[:, 1:], at72.name)  # a feature fewer: the head's first layer fails
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        train(data, tiny_config(tmp_path / "narrower", tiny_weights, **frozen, **{"data.image_size": 72}))
    assert history(tmp_path / "narrower") == history(tmp_path / "at72")
    (warning,) = warnings_from(caplog)
    assert f"rows of shape {features.shape[1:][0] - 1,}, where this model gives {features.shape[1:]}" in warning
    caplog.clear()
    elsewhere = tmp_path / "other-cache"
    train(data, tiny_config(tmp_path / "at64", tiny_weights, **frozen, cache_dir=str(elsewhere)))
    (at64,) = elsewhere.iterdir()
    for shard in at72.glob("*.npz"):
        shard.unlink()
    for shard in at64.glob("*.npz"):  # the same images and model, fed at 64 px: features of the same shape
        shutil.copy(shard, at72 / shard.name)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        train(data, tiny_config(tmp_path / "copied", tiny_weights, **frozen, **{"data.image_size": 72}))
    assert history(tmp_path / "copied") == history(tmp_path / "at72")
    (warning,) = warnings_from(caplog)
    assert "moved it aside" in warning
    assert f"rows of another model, preprocessing or boundary ({at64.name})" in warning


def test_whole_runs_on_seeded_mutations_of_a_real_activation_shard_train_as_a_clean_run_does(
    tmp_path: Path, tiny_weights: Path, feature_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    options = {"finetune_on": "activations", "frozen.epochs": 1, "finetune.epochs": 2, "finetune.patience": 2}
    clean = train(data, tiny_config(tmp_path / "clean", tiny_weights, **options)).metrics
    (activations,) = [p for p in feature_cache.iterdir() if "-after-" in p.name]
    (shard,) = activations.glob("*.npz")
    moved_aside = 0
    for seed in (8, 3, 36, 5):  # header bytes, any bytes, cut short, shape (the loop above tries all 200)
        cache = tmp_path / f"cache-{seed}"
        shutil.copytree(feature_cache, cache)
        (cache / activations.name / shard.name).write_bytes(mutated(shard.read_bytes(), seed))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="transferkit"):
            metrics = within(300, lambda: train(
                data, tiny_config(tmp_path / f"run-{seed}", tiny_weights, **options, cache_dir=str(cache))).metrics)
        assert history(tmp_path / f"run-{seed}") == history(tmp_path / "clean"), seed
        assert metrics["val"] == clean["val"], seed
        moved = not (cache / activations.name / shard.name).exists()
        assert len(warnings_from(caplog)) == moved, (seed, warnings_from(caplog))
        moved_aside += moved
    assert moved_aside >= 3, "nearly every mutation is caught, not harmless"
