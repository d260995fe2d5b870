from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import SHARED_DATASETS, TINY_MODEL, history_rows, make_folder, tiny_config

from transferkit import resume, train
from transferkit.commands.evaluate import evaluate
from transferkit.config import ModelConfig, TrainConfig
from transferkit.errors import RunFolderError
from transferkit.models.create import PooledFeatures, classifier_path, create_classifier
from transferkit.models.folder import load_model
from transferkit.models.freeze import backbone_blocks
from transferkit.run.folder import load_config
from transferkit.training.checkpoints import model_state
from transferkit.training.head_loop import SAVE_EVERY_SECONDS


def test_a_run_folder_holds_everything_to_rerun_evaluate_and_reuse(
    image_folder: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    (image_folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    run_dir = tmp_path / "run"
    result = train(image_folder, tiny_config(run_dir, tiny_weights))

    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml", "classes.json", "history.csv", "metrics.json", "splits.csv", "skipped.csv", "model",
        "checkpoints", "progress.json", "evaluation",
    }
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "frozen-best.ckpt", "frozen-last.ckpt", "finetune-best.ckpt", "finetune-last.ckpt",
    }
    assert json.loads((run_dir / "classes.json").read_text()) == ["blue", "red"] == result.classes
    assert "broken.jpg" in (run_dir / "skipped.csv").read_text()
    assert [Path(p).name for p, _ in result.skipped] == ["broken.jpg"]

    rows = history_rows(run_dir)
    assert [r["phase"] for r in rows] == ["frozen"] * 4 + ["finetune"]
    assert list(rows[0]) == ["phase", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    assert all(float(r["val_loss"]) > 0 and float(r["lr"]) > 0 for r in rows)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["val"]) >= {"accuracy", "macro_f1"} and set(metrics["test"]) >= {"accuracy", "macro_f1"}
    assert metrics["train_seconds"] > 0
    for phase in ("frozen", "finetune"):
        assert set(metrics["phases"][phase]["val"]) >= {"accuracy", "macro_f1", "log_loss"}, "phases side by side"
    for split in ("val", "test"):
        evaluation = json.loads((run_dir / "evaluation" / split / "metrics.json").read_text())
        assert evaluation["accuracy"] == metrics[split]["accuracy"]
        assert len(evaluation["per_class"]) == 2
        assert len((run_dir / "evaluation" / split / "predictions.csv").read_text().splitlines()) == 1 + evaluation["images"]
    assert metrics["val"]["accuracy"] >= 0.8, "colour classes are easy; the head must learn them"

    config = load_config(run_dir)
    assert config.model.name == "test_efficientnet" and config.frozen.epochs == 4
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["image_size"] == 64

    rebuilt = timm.create_model(f"local-dir:{run_dir / 'model'}", pretrained=True).eval()
    saved, model_config = load_model(run_dir / "model")
    assert model_config["label_names"] == ["blue", "red"]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), saved(x), atol=1e-6)


def test_frozen_phase_reads_each_image_through_the_backbone_once(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {"images": 0}
    original = PooledFeatures.forward

    def counting(self: PooledFeatures, images: torch.Tensor) -> torch.Tensor:
        seen["images"] += len(images)
        return original(self, images)

    # Count in eager mode: ONNX Runtime would run the exported graph, not this Python method.
    monkeypatch.setattr("transferkit.inference.predictor.cached_session", lambda *args, **kwargs: None)
    monkeypatch.setattr(PooledFeatures, "forward", counting)
    config = tiny_config(tmp_path / "run", tiny_weights, **{"frozen.epochs": 6, "finetune.epochs": 0})
    train(image_folder, config)
    # The one more is the blank image whose features settle the shape a cached row must have.
    assert seen["images"] == 50 + 1, "train + val + test images, once each, for 6 epochs"
    assert len(history_rows(tmp_path / "run")) == 6


@pytest.mark.parametrize("scheduler", ["cosine", "step", "plateau"])
def test_feature_cache_matches_training_through_the_backbone(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, scheduler: str
) -> None:
    # On features the head trains a whole epoch per Lightning step, stepping its own schedule.
    results = {}
    for cache in (True, False):
        config = tiny_config(
            tmp_path / f"run-{cache}", tiny_weights,
            **{"frozen.epochs": 3, "frozen.scheduler": scheduler, "finetune.epochs": 0, "feature_cache": cache,
               "model.drop_rate": 0.0},
        )
        rows = history_rows(train(image_folder, config).run_dir)
        results[cache] = {name: [float(r[name]) for r in rows] for name in ("val_loss", "train_loss", "lr")}
    for name in ("val_loss", "train_loss"):
        assert results[True][name] == pytest.approx(results[False][name], abs=1e-3), name
    assert results[True]["lr"] == pytest.approx(results[False]["lr"], rel=1e-6)
    if scheduler != "plateau":
        assert len(set(results[True]["lr"])) == 3, "the learning rate moves every epoch"


def test_existing_run_folder_is_not_overwritten(image_folder: Path, tmp_path: Path, tiny_weights: Path) -> None:
    config = tiny_config(tmp_path / "run", tiny_weights, **{"frozen.epochs": 1, "finetune.epochs": 0})
    train(image_folder, config)
    with pytest.raises(RunFolderError, match="already holds a run; resume it with --resume"):
        train(image_folder, config)


# Killed in the features phase (head-only checkpoints written every few seconds: a SIGKILL
# comes before the first, a SIGTERM writes one as it stops) or in fine-tuning (full checkpoints,
# after a finished phase), on images (every block unfrozen) or on cached activations (two
# blocks), cycling through them and two augmented views of each image.
@pytest.mark.parametrize(
    "killed_in, epochs, unfreeze, signum",
    [
        ("frozen", {"frozen": 300, "finetune": 1}, "all", signal.SIGKILL),
        ("frozen", {"frozen": 300, "finetune": 1}, "all", signal.SIGTERM),
        ("finetune", {"frozen": 3, "finetune": 12}, "all", signal.SIGKILL),
        ("finetune", {"frozen": 3, "finetune": 60}, "2", signal.SIGKILL),
    ],
    ids=["killed-in-frozen", "stopped-in-frozen", "killed-in-finetune-on-images", "killed-in-finetune-on-activations"],
)
def test_killed_run_resumes_to_the_metrics_of_a_run_never_stopped(
    tmp_path: Path, tiny_weights: Path, killed_in: str, epochs: dict[str, int], unfreeze: str, signum: int
) -> None:
    data = make_folder(tmp_path / "data", per_class=40)

    def command(run_dir: Path) -> list[str]:
        return [
            sys.executable, "-m", "transferkit.cli", "train", str(data), "--output", str(run_dir),
            "--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64",
            "--num-workers", "0", "--finetune-unfreeze", unfreeze, "--finetune-on", "auto", "--no-progress",
            *(["--finetune-views", "2"] if unfreeze != "all" else []),
            "--cache-dir", str(tmp_path / f"cache-{run_dir.name}"),
            *(f"--{phase}-{option}={count}" for phase, count in epochs.items() for option in ("epochs", "patience")),
        ]

    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    last = run_dir / "checkpoints" / f"{killed_in}-last.ckpt"

    def inside_the_phase() -> bool:
        if killed_in == "finetune":
            return last.exists()
        return (run_dir / "history.csv").exists() and len(history_rows(run_dir)) >= 3

    while not inside_the_phase() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    process.wait()
    assert process.returncode in (-signum, 128 + signum), "the run finished before it could be stopped"
    if signum == signal.SIGTERM:
        # A stop writes the last finished epoch's checkpoint, whatever the interval, and that
        # epoch's row: none is trained twice or lost from history.csv.
        assert torch.load(last)["progress"]["epochs_done"] == len(history_rows(run_dir))
    rows_before = history_rows(run_dir)
    assert rows_before[-1]["phase"] == killed_in and int(rows_before[-1]["epoch"]) < epochs[killed_in]
    assert not (run_dir / "metrics.json").exists()

    on_activations = [p.name for p in (tmp_path / "cache-killed").iterdir() if "-after-" in p.name]
    assert len(on_activations) == (3 if unfreeze != "all" else 0), "fine-tuning ran on the inputs the case names"

    result = resume(run_dir)
    rows = history_rows(run_dir)
    if killed_in == "finetune":
        assert [r for r in rows if r["phase"] == "frozen"] == [r for r in rows_before if r["phase"] == "frozen"], (
            "the finished phase is not redone"
        )
    for phase, count in epochs.items():
        assert [int(r["epoch"]) for r in rows if r["phase"] == phase] == list(range(1, count + 1)), (
            f"{phase}: no epoch twice, none missing"
        )
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert not [p.name for p in run_dir.rglob("*.tmp")]

    # The checkpoints carry the random generators, so on CPU the resumed run draws the same
    # shuffles and dropout masks as a run never stopped: equal to 1e-6, not merely close.
    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True)
    uninterrupted = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    for split in ("val", "test"):
        for name in ("accuracy", "log_loss", "macro_f1"):
            assert result.metrics[split][name] == pytest.approx(uninterrupted[split][name], abs=1e-6), (split, name)
    losses = [float(r["train_loss"]) for r in history_rows(tmp_path / "whole")]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(losses, abs=1e-6)


@contextlib.contextmanager
def renames_into(folder: Path) -> Iterator[Callable[[], list[str]]]:
    """The names of the files renamed into ``folder`` while inside, as the kernel reports them
    (inotify): every atomic write of a checkpoint ends in one such rename, after its fsync."""
    libc = ctypes.CDLL(None, use_errno=True)
    watch = libc.inotify_init1(os.O_NONBLOCK)
    assert watch >= 0 and libc.inotify_add_watch(watch, os.fsencode(folder), 0x80) >= 0  # IN_MOVED_TO
    names: list[str] = []

    def renamed() -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while events := os.read(watch, 1 << 20):
                offset = 0
                while offset < len(events):
                    _, _, _, length = struct.unpack_from("iIII", events, offset)
                    names.append(events[offset + 16:offset + 16 + length].rstrip(b"\0").decode())
                    offset += 16 + length
        return names

    try:
        yield renamed
    finally:
        os.close(watch)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts writes with Linux's inotify")
def test_the_head_phase_writes_its_checkpoints_every_few_seconds_not_every_epoch(
    image_folder: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with renames_into(run_dir / "checkpoints") as renamed:
        result = train(image_folder, tiny_config(
            run_dir, tiny_weights, **{"frozen.epochs": 150, "frozen.patience": 150, "finetune.epochs": 0}
        ))
        writes = Counter(renamed())
    frozen = result.metrics["phases"]["frozen"]
    assert frozen["epochs"] == 150
    # One write per SAVE_EVERY_SECONDS of training at most, and the one at the phase's end.
    assert 1 <= writes["frozen-last.ckpt"] <= frozen["fit_seconds"] / SAVE_EVERY_SECONDS + 1, writes
    assert 1 <= writes["frozen-best.ckpt"] <= writes["frozen-last.ckpt"], writes
    assert torch.load(run_dir / "checkpoints" / "frozen-last.ckpt")["progress"]["epochs_done"] == 150


def test_a_diverged_finetune_is_set_aside_for_the_features_phase_on_its_pretrained_backbone(
    image_folder: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    # A fine-tuning learning rate that sends the whole backbone to NaN from the first step.
    config = tiny_config(
        tmp_path / "run", tiny_weights,
        **{"finetune.lr": 1e6, "finetune.warmup_epochs": 0.0, "finetune.unfreeze": "all", "finetune.optimizer": "sgd"},
    )
    result = train(image_folder, config)
    assert result.best_phase == "frozen"
    assert result.metrics["phases"]["finetune"]["diverged"] and "val" not in result.metrics["phases"]["finetune"]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "frozen-best.ckpt").stat().st_size < (checkpoints / "finetune-best.ckpt").stat().st_size / 10, (
        "the features phase checkpoints its head, not the unchanged backbone"
    )

    saved, _ = load_model(tmp_path / "run" / "model")
    head = classifier_path(saved) + "."
    pretrained = torch.load(tiny_weights, weights_only=True)
    changed = [k for k, v in pretrained.items() if not k.startswith(head) and not torch.equal(saved.state_dict()[k], v)]
    assert not changed, "fine-tuning's backbone was saved under the features phase's head"
    assert evaluate(tmp_path / "run", split="val").metrics["accuracy"] == result.metrics["val"]["accuracy"]


def test_when_every_phase_diverges_train_says_so_in_one_line(image_folder: Path, tmp_path: Path, tiny_weights: Path) -> None:
    command = [
        sys.executable, "-m", "transferkit.cli", "train", str(image_folder), "--output", str(tmp_path / "run"),
        "--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0",
        "--frozen-optimizer", "sgd", "--frozen-lr", "1e30", "--finetune-optimizer", "sgd", "--finetune-lr", "1e30",
        "--no-progress", "--no-report",
    ]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert process.returncode != 0
    assert "Traceback" not in process.stderr
    assert "every phase diverged" in process.stderr.strip().splitlines()[-1]
    assert "--frozen-lr" in process.stderr and "--finetune-lr" in process.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATASETS / "hymenoptera").is_dir(), reason="needs ../shared/datasets")
def test_default_recipe_on_hymenoptera_reaches_093(tmp_path: Path) -> None:
    config = TrainConfig.from_options(
        {"data.data_mirror": str(SHARED_DATASETS), "output": str(tmp_path / "run"), "progress": False}
    )
    result = train("hymenoptera", config)
    assert result.metrics["val"]["accuracy"] >= 0.93
    assert result.counts["train"] == {"ants": 123, "bees": 121}


@pytest.mark.parametrize("policy", ["frozen", "train"])
@pytest.mark.parametrize("unfreeze", ["all", "2"], ids=["on-images", "on-activations"])
def test_batchnorm_policy_holds_through_a_real_finetune(
    image_folder: Path, tmp_path: Path, tiny_weights: Path, policy: str, unfreeze: str
) -> None:
    config = tiny_config(
        tmp_path / "run", tiny_weights,
        **{"frozen.epochs": 1, "finetune.epochs": 2, "finetune.unfreeze": unfreeze, "batchnorm": policy,
           "finetune_on": "activations" if unfreeze == "2" else "images"},
    )
    train(image_folder, config)
    initial = torch.load(tiny_weights, weights_only=True)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "finetune-last.ckpt", map_location="cpu", weights_only=True)
    state = model_state(checkpoint)
    tiny = create_classifier(ModelConfig(name=TINY_MODEL, weights="none"), num_classes=3)
    trained = {name for block in backbone_blocks(tiny)[-2:] for name in block}
    means = [k for k in initial if k.endswith("running_mean")]
    in_trained_blocks = [k for k in means if unfreeze == "all" or k.removesuffix(".running_mean") + ".weight" in trained]
    below = [k for k in means if k not in in_trained_blocks]
    assert in_trained_blocks
    assert all(torch.equal(initial[k], state[k]) for k in in_trained_blocks) == (policy == "frozen")
    # What cached activations rely on: a frozen block's statistics never move, whatever the policy.
    assert all(torch.equal(initial[k], state[k]) for k in below)


def test_the_same_seed_gives_identical_metrics_on_cpu(image_folder: Path, tmp_path: Path, tiny_weights: Path) -> None:
    def outcome(name: str) -> tuple[list[dict[str, str]], dict]:
        # Its own feature cache, so both runs compute everything; two decoding workers with
        # augmentation on images, the parts most likely to break determinism.
        config = tiny_config(
            tmp_path / name, tiny_weights,
            **{"frozen.epochs": 2, "finetune.epochs": 2, "finetune.patience": 2, "finetune.augment": "strong",
               "finetune_on": "images",
               "data.num_workers": 2, "cache_dir": str(tmp_path / f"cache-{name}")},
        )
        metrics = train(image_folder, config).metrics
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in history_rows(tmp_path / name)]
        metrics.pop("train_seconds")
        metrics.pop("features")
        for phase in metrics["phases"].values():
            phase.pop("fit_seconds")
        return rows, metrics

    first, second = outcome("first"), outcome("second")
    assert len(first[0]) == 4
    assert first == second


@pytest.mark.parametrize("finetune_on", ["auto", "images"])  # on cached activations, and through the whole model
def test_two_cpu_processes_split_the_data_and_rank_zero_writes_the_run(
    tmp_path: Path, tiny_weights: Path, finetune_on: str
) -> None:
    data = make_folder(tmp_path / "data", per_class=25)
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "transferkit.cli", "train", str(data), "--output", str(run_dir),
        "--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64", "--batch-size", "16",
        "--num-workers", "0", "--frozen-epochs", "2", "--finetune-epochs", "2", "--finetune-patience", "2",
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-progress", "--finetune-on", finetune_on,
        "--verbose",  # each process's "phase ... trainable" step is an INFO line
    ]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert (process.stdout + process.stderr).count("phase finetune: trainable") == 2, "both processes trained"
    assert process.stdout.count("run folder:") == 1, "one summary, from rank zero"

    # 40 training images, batches of 16: one process takes 3 steps an epoch; two processes that
    # each get a disjoint half (Lightning's DistributedSampler) take 2. The head on cached
    # features is not split: each process trains it on every image, in milliseconds.
    checkpoints = run_dir / "checkpoints"
    head = torch.load(checkpoints / "frozen-last.ckpt", map_location="cpu", weights_only=True)
    assert {int(state["step"]) for state in head["optimizer"]["state"].values()} == {2 * 3}
    finetune = torch.load(checkpoints / "finetune-last.ckpt", map_location="cpu", weights_only=True)
    assert finetune["global_step"] == 2 * 2
    assert [(r["phase"], r["epoch"]) for r in history_rows(run_dir)] == [
        ("frozen", "1"), ("frozen", "2"), ("finetune", "1"), ("finetune", "2"),
    ], "each epoch recorded once"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] >= 0.75
    assert (run_dir / "report.html").is_file() and (run_dir / "model" / "model.safetensors").is_file()
    assert not list(run_dir.rglob("*.tmp"))
