"""Group-aware splits: near-copies and --group-by's groups stay on one side of a carved split, and
near-copies of training images in val or test are reported, whoever made the split."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from transferkit import train
from transferkit._io import read_csv_rows
from transferkit.cli import main
from transferkit.data.groups import connected_groups, grouped_split, near_copy_pairs


def make_scene(path: Path, seed: int, nudged: bool = False) -> Path:
    """A 4 x 4 grid of random colours: a tiny random backbone keeps two scenes apart (cosine
    below 0.85) and a nudged copy, one cell a few levels brighter, close (above 0.99)."""
    grid = np.random.default_rng(seed).integers(0, 250, (4, 4, 3)).astype(np.uint8)
    if nudged:
        grid[0, 0] += 4
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((40, 32), Image.NEAREST).save(path)
    return path


def quick_config(output: Path, weights: Path, **overrides: object):
    return tiny_config(output, weights, **{"frozen.epochs": 1, "finetune.epochs": 0, **overrides})


def splits_of(run_dir: Path) -> dict[str, tuple[str, str]]:
    """path: (split, group) from splits.csv."""
    return {row["path"]: (row["split"], row["group"]) for row in read_csv_rows(run_dir / "splits.csv")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_keeps_each_group_whole_and_every_class_in_train_and_val(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for label, count in enumerate((4, 9, 30)):  # one class of few groups, one of many
        for group in range(count):
            size = int(rng.integers(1, 6))
            labels += [label] * size
            groups += [f"{label}-{group}"] * size
    parts = grouped_split(labels, groups, (0.8, 0.16, 0.04), seed, ["a", "b", "c"])

    for group in set(groups):
        assert len({part for part, g in zip(parts, groups) if g == group}) == 1, group
    labels_array = np.array(labels)
    for label in range(3):
        assert {0, 1} <= set(parts[labels_array == label])
    # The largest class's val share is close to 16%: within the largest group's 5 images.
    largest = labels_array == 2
    assert abs((parts[largest] == 1).sum() - 0.16 * largest.sum()) <= 5
    assert np.array_equal(parts, grouped_split(labels, groups, (0.8, 0.16, 0.04), seed, ["a", "b", "c"]))


def test_the_split_joins_a_burst_pair_the_audit_would_not_call_a_copy() -> None:
    # Two shots of one scene, each other's nearest (cosine 0.90), and a third shot of it at 0.86:
    # the pair's distance is 0.7 of the next-nearest's, not the audit's 0.6. Missed, such a pair
    # lands on both sides of the split; joined in vain, it costs the split nothing.
    rng = np.random.default_rng(0)
    scene, *shots = np.linalg.qr(rng.normal(size=(64, 4)))[0].T  # orthonormal: the scene and three ways to vary it
    first, second, third = scene + 0.333 * shots[0], scene + 0.333 * shots[1], scene + 0.475 * shots[2]
    features = np.vstack([rng.normal(size=(200, 64)), first, second, third])
    joined, reported = near_copy_pairs(features, 0.99)
    burst = (200, 201)  # the first and second shots
    assert burst in {(i, j) for i, j, _ in joined}, "the split keeps the two shots together"
    assert burst not in {(i, j) for i, j, _ in reported}, "the audit and the leak check stay as strict as before"


def test_the_split_keeps_a_burst_of_four_shots_together_without_a_fifth_farther_one() -> None:
    # Four shots of one scene, each 0.90 like the other three: no shot is distinctly nearest to any
    # one other (a copy whose original has another copy pair of its scene nearer), but the three
    # stand apart from the rest. A fifth shot at 0.86 to each of them has no such gap and stays alone.
    rng = np.random.default_rng(1)
    scene, *ways = np.linalg.qr(rng.normal(size=(64, 6)))[0].T
    shots = [scene + ways[k] / 3 for k in range(4)] + [scene + 0.47 * ways[4]]
    features = np.vstack([rng.normal(size=(200, 64)), *shots])
    joined, reported = near_copy_pairs(features, 0.99)
    group = connected_groups(len(features), [(i, j) for i, j, _ in joined])
    assert len({group[i] for i in range(200, 204)}) == 1, "the four shots land on one side"
    assert np.sum(group == group[200]) == 4, "the fifth shot and the random images are not drawn in"
    assert not [pair for pair in reported if pair[0] >= 200], "the audit calls none of them a copy"


def test_a_class_of_one_group_trains_and_is_named(caplog: pytest.LogCaptureFixture) -> None:
    labels = [0] * 6 + [1] * 20
    groups = ["one patient"] * 6 + [f"p{i}" for i in range(20)]
    with caplog.at_level(logging.WARNING):
        parts = grouped_split(labels, groups, (0.84, 0.16), 0, ["rare", "common"])
    assert set(parts[:6]) == {0}
    assert set(parts[6:]) == {0, 1}
    assert "single group get no validation image: rare" in caplog.text


def near_copy_folder(root: Path, scenes: int = 12) -> Path:
    """DATA/<class>/ holding each scene and a nudged copy of it."""
    for k, name in enumerate(("left", "right")):
        for i in range(scenes):
            make_scene(root / name / f"scene{i:02d}.png", seed=100 * k + i)
            make_scene(root / name / f"scene{i:02d}_copy.png", seed=100 * k + i, nudged=True)
    return root


def test_default_split_keeps_every_near_copy_with_its_original(tmp_path: Path, tiny_weights: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    data = near_copy_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        # fine-tuned on cached activations too: computed before the split, cut by the split after it
        assert main(["train", str(data), "--output", str(tmp_path / "run"), "--model", "test_efficientnet",
                     "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0", "--frozen-epochs", "1",
                     "--finetune-epochs", "1", "--finetune-unfreeze", "2", "--no-progress", "--no-audit"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["phases"]["finetune"]["done"]
    rows = splits_of(tmp_path / "run")
    originals = [path for path in rows if not path.endswith("_copy.png")]
    for original in originals:
        assert rows[original] == rows[original.replace(".png", "_copy.png")], original
    assert len({group for _, group in rows.values()}) == len(originals)
    assert {split for split, _ in rows.values()} >= {"train", "val"}
    assert read_csv_rows(tmp_path / "run" / "leaks.csv") == []
    assert "near-copy pairs" not in caplog.text
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["leaks"]["pairs"] == {}


def make_textured_scene(path: Path, seed: int) -> Path:
    """A 4 x 4 grid of random colours under strong pixel noise, and beside it the copy a careless
    re-save makes: shifted by a pixel and re-encoded as a JPEG at quality 5, which smooths the noise
    away. A tiny random backbone's features of the copy move as far as another scene's; its grey
    thumbnail barely moves."""
    rng = np.random.default_rng(seed)
    grid = np.asarray(Image.fromarray(rng.integers(0, 250, (4, 4, 3)).astype(np.uint8)).resize((64, 64), Image.NEAREST))
    pixels = np.clip(grid.astype(np.int16) + rng.integers(-120, 121, grid.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    buffer = io.BytesIO()
    Image.fromarray(np.roll(pixels, 1, axis=seed % 2)).save(buffer, format="JPEG", quality=5)
    path.with_name(f"{path.stem}_copy.jpg").write_bytes(buffer.getvalue())
    return path


def test_the_split_keeps_a_re_encoded_copy_the_features_miss_with_its_original(
    tmp_path: Path, tiny_weights: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    from transferkit.cache.passes import cached_pooled_features, cached_thumbnails
    from transferkit.config import ModelConfig
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.models.create import create_classifier

    data = tmp_path / "data"
    for k, name in enumerate(("left", "right")):
        for i in range(12):
            make_scene(data / name / f"scene{i:02d}.png", seed=100 * k + i)
        for i in range(6):
            make_textured_scene(data / name / f"textured{i}.png", seed=5000 + 100 * k + i)
    paths = sorted(str(path) for path in data.glob("*/*"))
    copies = [(paths.index(path.replace("_copy.jpg", ".png")), i) for i, path in enumerate(paths) if path.endswith("_copy.jpg")]
    # what the features alone make of these copies, on the run's model, in a cache of its own
    model = create_classifier(ModelConfig(name="test_efficientnet", weights=str(tiny_weights)), 2, 64)
    preprocessing = resolve_preprocessing(model, 64)
    features, _ = cached_pooled_features(model, paths, preprocessing, "avg", "cpu", tmp_path / "own-cache", 0)
    joined, _ = near_copy_pairs(features, 0.95)
    missed = [pair for pair in copies if pair not in {(i, j) for i, j, _ in joined}]
    assert len(missed) >= len(copies) // 2, "half the copies are beyond the features' rule"
    (features_folder,) = (tmp_path / "own-cache").iterdir()
    assert cached_thumbnails(paths, preprocessing, features_folder, 0)[1].from_cache == len(paths), \
        "the feature pass kept every thumbnail from its decode, in the backbone's folder"

    with caplog.at_level(logging.INFO):
        # fine-tuned on cached activations: the activation pass computes the features and thumbnails
        result = train(data, quick_config(tmp_path / "run", tiny_weights, **{"finetune.epochs": 1}))
    rows = splits_of(result.run_dir)
    for original, copy in copies:
        assert rows[paths[original]] == rows[paths[copy]], paths[copy]
    assert {split for split, _ in rows.values()} >= {"train", "val"}
    assert f"thumbnails: {len(paths)} images, {len(paths)} from the cache" in caplog.text, "no second decode pass"
    assert read_csv_rows(result.run_dir / "leaks.csv") == []


def test_random_split_warns_of_the_near_copies_it_puts_in_val(tmp_path: Path, tiny_weights: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    data = near_copy_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        train(data, quick_config(tmp_path / "run", tiny_weights, **{"data.split_groups": "none"}))
    leaks = read_csv_rows(tmp_path / "run" / "leaks.csv")
    rows = splits_of(tmp_path / "run")
    crossing = [path for path in rows if not path.endswith("_copy.png")
                and rows[path][0] != rows[path.replace(".png", "_copy.png")][0]]
    assert crossing and len(leaks) >= len(crossing)
    warnings = [record.getMessage() for record in caplog.records if "near-copy pairs" in record.getMessage()]
    assert len(warnings) == 1 and "--split-groups none" in warnings[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sum(metrics["leaks"]["pairs"].values()) == len(leaks)


def test_group_by_keeps_each_patient_on_one_side(tmp_path: Path, tiny_weights: Path) -> None:
    data = tmp_path / "data"
    for k, name in enumerate(("healthy", "sick")):
        for patient in range(8):
            for shot in range(3):
                make_scene(data / name / f"patient{k}{patient}_shot{shot}.png", seed=1000 * k + 10 * patient + shot)
    train(data, quick_config(tmp_path / "run", tiny_weights, **{"data.group_by": r"patient(\d+)_"}))
    rows = splits_of(tmp_path / "run")
    sides: dict[str, set[str]] = {}
    for path, (split, group) in rows.items():
        assert f"patient{group}_" in Path(path).name
        sides.setdefault(group, set()).add(split)
    assert len(sides) == 16 and all(len(splits) == 1 for splits in sides.values())
    for name in ("healthy", "sick"):
        assert {split for path, (split, _) in rows.items() if f"/{name}/" in path} >= {"train", "val"}


def test_copies_in_a_given_val_folder_are_reported_and_left_out_of_calibration(
    tmp_path: Path, tiny_weights: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    copied = []
    for k, name in enumerate(("left", "right")):
        for i in range(20):
            make_scene(data / "train" / name / f"train{i:02d}.png", seed=100 * k + i)
        for i in range(30):
            make_scene(data / "val" / name / f"val{i:02d}.png", seed=5000 + 100 * k + i)
        for i in range(3):  # the user's val folder holds copies of training images
            copied.append(make_scene(data / "val" / name / f"copy{i:02d}.png", seed=100 * k + i, nudged=True))
    with caplog.at_level(logging.INFO):
        assert main(["train", str(data), "--output", str(tmp_path / "run"), "--model", "test_efficientnet",
                     "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0", "--frozen-epochs", "1",
                     "--finetune-epochs", "0", "--no-progress", "--no-audit", "--report"]) == 0
    leaks = read_csv_rows(tmp_path / "run" / "leaks.csv")
    leaky = {row["path"] for row in leaks}
    assert {str(path) for path in copied} <= leaky
    assert all(row["split"] == "val" and row["paired_split"] == "train" for row in leaks)
    warnings = [record.getMessage() for record in caplog.records if "near-copy pairs" in record.getMessage()]
    assert len(warnings) == 1 and f"{len(leaks)} to val" in warnings[0] and "--exclude leaks.csv" in warnings[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["leaks"]["pairs"] == {"val": len(leaks)}
    assert metrics["calibration"]["images"] == 66 - len(leaky)
    assert metrics["unknown"]["images"] == 66 - len(leaky)
    assert f"early stopping, the best phase, the temperature and the unknown threshold read the {66 - len(leaky)} " \
           "of 66 validation images" in caplog.text
    printed = capsys.readouterr().out
    assert f"validation accuracy of the saved model: {metrics['val']['accuracy']:.4f}" in printed
    assert f"(inflated: {len(leaks)} near-copy pairs with train, in leaks.csv)" in printed
    report = (tmp_path / "run" / "report.html").read_text()
    assert f"inflated: {len(leaks)} near-copy pairs with train" in report
    assert report.count('alt="train"') == min(len(leaks), 8)


def test_audit_splits_as_train_does_and_finds_no_leak_the_groups_prevent(tmp_path: Path, tiny_weights: Path) -> None:
    from transferkit.audit.config import AuditConfig
    from transferkit.commands.audit import audit

    data = near_copy_folder(tmp_path / "data")
    train(data, quick_config(tmp_path / "run", tiny_weights))
    options = {"data.image_size": 64, "data.num_workers": 0, "model.name": "test_efficientnet",
               "model.weights": str(tiny_weights), "output": str(tmp_path / "audit"), "progress": False,
               "html": False}
    result = audit(data, AuditConfig.from_options(options))
    trained = {path: split for path, (split, _) in splits_of(tmp_path / "run").items()}
    assert dict(zip(result.images.paths, result.images.splits)) == trained
    assert result.of_kind("leakage") == []
    assert len(result.of_kind("near_duplicate")) == 24  # each copy beside its original, within one split


def test_compare_trains_every_run_on_the_groups_train_makes(tmp_path: Path, tiny_weights: Path) -> None:
    from transferkit.commands.compare import compare

    data = near_copy_folder(tmp_path / "data")
    trained = splits_of(train(data, quick_config(tmp_path / "run", tiny_weights)).run_dir)
    options = {"data.image_size": 64, "data.num_workers": 0, "model.weights": str(tiny_weights), "progress": False,
               "report": False, "cache_dir": str(tmp_path / "cache")}
    compare(str(data), strategies=["frozen", "frozen-dense"], models=["test_efficientnet"], epochs=1,
            output=tmp_path / "comparison", hidden_size=8, options=options)
    for name in ("frozen", "frozen-dense"):
        assert splits_of(tmp_path / "comparison" / name) == trained, name
    sides: dict[str, set[str]] = {}
    for split, group in trained.values():
        sides.setdefault(group, set()).add(split)
    assert len(sides) == 24 and all(len(splits) == 1 for splits in sides.values())
    assert {split for split, _ in trained.values()} >= {"train", "val"}


def test_max_per_class_still_bounds_each_split_cut_by_groups(tmp_path: Path) -> None:
    from transferkit.data.index import DatasetIndex

    items = [(f"/data/{name}/{i}.png", label) for label, name in enumerate(("a", "b")) for i in range(30)]
    index = DatasetIndex(root=Path("/data"), classes=["a", "b"], splits={"train": items[:48], "val": items[48:]},
                         carved={"train": 0.8, "val": 0.2})
    index.carve_by_groups({path: path[:-5] for path, _ in items}, seed=0, max_per_class=5)
    assert all(count <= 5 for counts in index.counts().values() for count in counts.values())
    assert index.counts()["val"] == {"a": 5, "b": 5}


def test_copies_in_a_given_test_folder_get_the_fix_for_a_users_folder(tmp_path: Path, tiny_weights: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"  # train/ and test/ only: val is carved from train/, test/ is the user's
    for k, name in enumerate(("left", "right")):
        for i in range(20):
            make_scene(data / "train" / name / f"train{i:02d}.png", seed=100 * k + i)
        for i in range(6):
            make_scene(data / "test" / name / f"test{i:02d}.png", seed=7000 + 100 * k + i)
        for i in range(4):
            make_scene(data / "test" / name / f"copy{i:02d}.png", seed=100 * k + i, nudged=True)
    with caplog.at_level(logging.WARNING):
        result = train(data, quick_config(tmp_path / "run", tiny_weights))
    warnings = [record.getMessage() for record in caplog.records if "near-copy pairs" in record.getMessage()]
    assert len(warnings) == 1 and "to test" in warnings[0]
    assert "--exclude leaks.csv" in warnings[0] and "--group-by" not in warnings[0]
    assert result.run_metrics.inflated("test") > 0 and result.run_metrics.inflated("val") == 0
