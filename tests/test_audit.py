"""transferkit audit on folders made to hold each problem it looks for, with a tiny real backbone."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, make_folder, make_image, render_in_chromium, tiny_config
from transferkit import train
from transferkit._io import read_csv_rows
from transferkit.audit.config import AuditConfig
from transferkit.audit.page import TYPICAL
from transferkit.commands.audit import audit
from transferkit.audit.checks import near_duplicate_pairs, nearest_neighbours, outlier_scores
from transferkit.cli import main

NEAR_COPY_THRESHOLD = 0.99
"""For the tiny random backbone, whose features of any two photos of one colour are closer than
Lite0's; the default (0.95) was chosen on Lite0 and the real datasets."""


def tiny_audit_options(output: Path, weights: Path, **overrides: object) -> dict[str, object]:
    options: dict[str, object] = {
        "data.image_size": 64, "data.num_workers": 0, "model.name": "test_efficientnet",
        "model.weights": str(weights), "output": str(output), "progress": False,
    }
    options.update(overrides)
    return options


def make_scene(path: Path, seed: int, colour: tuple[int, int, int]) -> Path:
    """A photo-like image of its own: coarse random shapes over a class colour, so two scenes
    differ in layout and a near-copy of one (re-encoded, shrunk) keeps it."""
    rng = np.random.default_rng(seed)
    grid = np.clip(np.array(colour) + rng.normal(0, 70, (6, 6, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(grid).resize((72, 72), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)
    return path


def near_copy(source: Path, target: Path) -> Path:
    """The same photo re-encoded at lower quality and a little smaller, as a re-upload is."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        image.resize((66, 66), Image.BICUBIC).save(target, quality=70)
    return target


@pytest.mark.parametrize("on_components", [False, True], ids=["whole-features", "principal-components"])
def test_flipped_labels_are_the_top_suspects_with_their_true_class_suggested(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, on_components: bool
) -> None:
    from transferkit.audit import checks

    data = make_folder(tmp_path / "data", per_class=20, classes=("blue", "green", "red"))
    flipped = {make_image(data / "blue" / f"was_red_{i}.jpg", COLOURS["red"], seed=500 + i): "red" for i in range(2)}
    flipped[make_image(data / "red" / "was_green.jpg", COLOURS["green"], seed=600)] = "green"
    if on_components:  # as a folder of more than 20,000 images is audited, at this folder's size
        monkeypatch.setattr(checks, "REDUCE_ABOVE_IMAGES", 50)
        monkeypatch.setattr(checks, "REDUCED_DIMENSIONS", 8)

    result = audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights)))

    assert result.summary["principal_components"] == (8 if on_components else None)
    issues = result.of_kind("label_issue")
    assert {Path(f.path) for f in issues[:3]} == set(flipped)
    for finding in issues[:3]:
        assert finding.suggested_label == flipped[Path(finding.path)]
        assert finding.label != finding.suggested_label
    rows = [row for row in read_csv_rows(result.csv_file) if row["kind"] == "label_issue"]
    assert [row["path"] for row in rows] == [f.path for f in issues], "audit.csv lists them in rank order"
    scores = read_csv_rows(result.output / "scores.csv")
    assert len(scores) == 63
    worst = sorted(scores, key=lambda row: float(row["label_quality"]))[:3]
    assert {Path(row["path"]) for row in worst} == set(flipped)
    health = {h.name: h for h in result.health}
    assert health["blue"].noise_rate > 0 and health["blue"].label_issues >= 2


def test_copies_across_splits_and_classes_are_leakage_and_conflicts(tmp_path: Path, tiny_weights: Path) -> None:
    data = tmp_path / "data"
    for k, (name, colour) in enumerate(COLOURS.items()):
        for split, count in (("train", 12), ("val", 6)):
            for i in range(count):
                make_scene(data / split / name / f"{name}_{i}.jpg", seed=1000 * k + 100 * (split == "val") + i, colour=colour)
    leaked = near_copy(data / "train" / "blue" / "blue_0.jpg", data / "val" / "blue" / "blue_0_reupload.jpg")
    within = near_copy(data / "train" / "green" / "green_3.jpg", data / "train" / "green" / "green_3_copy.jpg")
    conflict = data / "train" / "red" / "blue_5_misfiled.jpg"
    shutil.copyfile(data / "train" / "blue" / "blue_5.jpg", conflict)

    result = audit(data, AuditConfig.from_options(
        tiny_audit_options(tmp_path / "audit", tiny_weights, duplicate_threshold=NEAR_COPY_THRESHOLD)))

    pairs = {(Path(f.path).name, Path(f.paired_path).name): f for f in result.findings if f.paired_path}
    assert set(pairs) == {
        ("blue_0_reupload.jpg", "blue_0.jpg"), ("green_3_copy.jpg", "green_3.jpg"), ("blue_5_misfiled.jpg", "blue_5.jpg"),
    }, "each copy is paired with its original and no two different scenes are"
    leak = pairs[("blue_0_reupload.jpg", "blue_0.jpg")]
    assert (leak.kind, leak.split, leak.paired_split, leak.identical) == ("leakage", "val", "train", False)
    assert pairs[("green_3_copy.jpg", "green_3.jpg")].kind == "near_duplicate"
    misfiled = pairs[("blue_5_misfiled.jpg", "blue_5.jpg")]
    assert (misfiled.kind, misfiled.label, misfiled.paired_label, misfiled.identical) == ("label_conflict", "red", "blue", True)
    assert misfiled.score == pytest.approx(1.0)
    counts = json.loads(result.json_file.read_text())["counts"]
    assert (counts["leakage"], counts["label_conflict"], counts["near_duplicate"], counts["identical_groups"]) == (1, 1, 1, 1)
    assert leaked.exists() and within.exists() and conflict.exists(), "the audit never moves or deletes a file"


def test_an_image_unlike_the_rest_is_the_first_outlier(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=20)
    stripes = np.zeros((40, 40, 3), np.uint8)
    stripes[::4] = 255  # a screenshot-like pattern among photos of flat colour
    Image.fromarray(stripes).save(data / "red" / "screenshot.png")

    result = audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights)))

    outliers = result.of_kind("outlier")
    assert outliers and Path(outliers[0].path).name == "screenshot.png"
    others = [score for path, score in zip(result.images.paths, result.images.outlier_score) if "screenshot" not in path]
    assert outliers[0].score > 2 * max(others), "far beyond every ordinary image"
    assert len(outliers) <= 4, "a folder of ordinary images is not flagged wholesale"


def test_class_health_names_small_and_imbalanced_classes(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=40, classes=("blue", "red"))
    make_folder(data, per_class=8, classes=("green",))

    result = audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights)))

    health = {h.name: h for h in result.health}
    assert any("training images" in problem for problem in health["green"].problems)
    assert any("validation images" in problem for problem in health["green"].problems)
    assert not health["blue"].problems
    assert result.summary["imbalance_ratio"] == pytest.approx(40 / 8)
    assert sum(h.images.get("train", 0) + h.images.get("val", 0) + h.images.get("test", 0) for h in health.values()) == 88


def test_a_warm_feature_cache_from_train_means_the_audit_computes_no_feature(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    train(data, tiny_config(tmp_path / "run", tiny_weights, **{"finetune.epochs": 0}))

    result = audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights)))

    assert result.summary["features"]["from_cache"] == result.summary["images"] == 24


def test_the_command_writes_its_files_and_prints_one_line_per_problem(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    output = tmp_path / "audit"
    code = main(["audit", str(data), "--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64",
                 "--num-workers", "0", "--output", str(output), "--folds", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "audit of 24 images:" in printed and str(output) in printed
    assert {p.name for p in output.iterdir()} >= {"audit.csv", "audit.json", "scores.csv"}
    assert read_csv_rows(output / "audit.csv") == [] or set(read_csv_rows(output / "audit.csv")[0]) >= {"kind", "path", "score"}
    assert json.loads((output / "audit.json").read_text())["images"] == 24


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--folds", "1"], "--folds must be at least 2, got 1"),
        (["--duplicate-threshold", "1.5"], "--duplicate-threshold must be above 0 and at most 1"),
        (["--model", "efficientnet_b99"], "efficientnet_b99"),
    ],
)
def test_bad_options_are_one_line_errors(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=3)
    assert main(["audit", str(data), "--output", str(tmp_path / "audit"), *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "audit").exists()


def test_missing_data_is_named_with_every_other_problem(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--folds", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert any("DATA is required" in line for line in errors) and any("--folds" in line for line in errors)


def test_near_duplicate_pairs_are_listed_once_most_similar_first() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 16)).astype(np.float32)
    features[7] = features[3] * 2  # the same direction: cosine similarity 1
    features[12] = features[20] + rng.normal(0, 0.05, 16)

    similarities, neighbours = nearest_neighbours(features, k=5)
    pairs = near_duplicate_pairs(similarities, neighbours, threshold=0.95)

    assert [(i, j) for i, j, _ in pairs] == [(3, 7), (12, 20)]
    assert pairs[0][2] == pytest.approx(1.0, abs=1e-5) and 0.95 <= pairs[1][2] < pairs[0][2]
    expected = features[12] @ features[20] / np.linalg.norm(features[12]) / np.linalg.norm(features[20])
    assert pairs[1][2] == pytest.approx(expected, abs=1e-5)


def test_a_copy_below_the_threshold_is_found_where_it_stands_out_from_its_neighbours() -> None:
    rng = np.random.default_rng(0)

    def around(centre: np.ndarray, similarity: float) -> np.ndarray:
        """A unit vector at exactly ``similarity`` cosine from the unit ``centre``."""
        other = rng.normal(size=centre.shape)
        other -= (other @ centre) * centre
        return similarity * centre + np.sqrt(1 - similarity**2) * other / np.linalg.norm(other)

    spread = rng.normal(size=(40, 64))  # scenes of their own: far from each other
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    copy = around(spread[0], 0.9)  # an altered copy: 0.9 from its original, far from the rest
    dense = rng.normal(size=64)
    dense /= np.linalg.norm(dense)
    crowd = np.stack([around(dense, 0.96) for _ in range(6)])  # shots alike: each about 0.92 from every other
    features = np.vstack([spread, copy, crowd]).astype(np.float32)

    similarities, neighbours = nearest_neighbours(features, k=5)
    pairs = near_duplicate_pairs(similarities, neighbours, threshold=0.95)

    assert (0, 40, pytest.approx(0.9, abs=1e-4)) in pairs
    assert not [pair for pair in pairs if pair[0] >= 41], "a crowd of look-alikes is no set of copies"


def test_the_search_on_principal_components_finds_the_exact_neighbours_of_clustered_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transferkit.audit import checks

    # Like backbone features: most of the variance in a few directions, a little in the rest.
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(8, 12))[rng.integers(0, 8, 400)] + rng.normal(0, 0.4, (400, 12))
    features = (latent @ rng.normal(size=(12, 64)) + rng.normal(0, 0.05, (400, 64))).astype(np.float32)
    exact = nearest_neighbours(features, k=5)
    assert checks.principal_components(features) is None, "400 images are searched on the whole features"
    monkeypatch.setattr(checks, "REDUCE_ABOVE_IMAGES", 100)
    monkeypatch.setattr(checks, "REDUCED_DIMENSIONS", 16)
    components = checks.principal_components(features)
    assert components is not None and components.shape == (400, 16)
    projected = nearest_neighbours(features, k=5, components=components)
    assert np.mean(projected[1] == exact[1]) > 0.95
    assert np.all(projected[0] <= exact[0] + 1e-5), "a candidate is never more similar than the true neighbour"
    np.testing.assert_allclose(projected[0][:, 0], exact[0][:, 0], atol=1e-5)


def test_the_regression_penalty_is_chosen_by_out_of_sample_log_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from transferkit.audit import checks

    # Two overlapping classes in 300 noisy dimensions: a weak penalty memorises the noise and is
    # confidently wrong out of sample; a strong one is not.
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    features = rng.normal(size=(400, 300)).astype(np.float32)
    features[:, 0] += labels * 1.5
    chosen = checks.out_of_sample_probabilities(features, labels, 2)
    monkeypatch.setattr(checks, "REGULARISATIONS", (1.0,))
    weakest = checks.out_of_sample_probabilities(features, labels, 2)

    assert chosen.regularisation < 1.0
    assert chosen.log_loss < weakest.log_loss - 0.1
    given = chosen.probabilities[np.arange(400), labels]
    assert np.median(given) > 0.5 and given.min() > 1e-3, "no image's label scored as impossible"


def test_outlier_scores_are_the_distance_to_the_nearest_class_centre() -> None:
    features = np.array([[1, 0], [2, 0.1], [0, 1], [0.1, 3], [1, 1]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 0])
    scores = outlier_scores(features, labels, 2)
    assert np.argmax(scores) == 4, "between both classes, near neither"
    assert scores[0] < 0.05 and scores[2] < 0.05


def test_train_exclude_leaves_out_the_images_an_audit_listed_and_says_why(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=15)
    misfiled = make_image(data / "blue" / "was_red.jpg", COLOURS["red"], seed=700)
    result = audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights)))
    assert str(misfiled) in [f.path for f in result.of_kind("label_issue")]
    # Filtered by hand: the user keeps the rows they agree with, here the suspect alone.
    rows = [row for row in read_csv_rows(result.csv_file) if row["path"] == str(misfiled)]
    picked = tmp_path / "picked.csv"
    picked.write_text("kind,path\n" + "".join(f"{row['kind']},{row['path']}\n" for row in rows))

    run_dir = tmp_path / "run"
    code = main(["train", str(data), "--output", str(run_dir), "--model", "test_efficientnet", "--weights", str(tiny_weights),
                 "--image-size", "64", "--num-workers", "0", "--frozen-epochs", "1", "--finetune-epochs", "0",
                 "--no-report", "--no-progress", "--exclude", str(picked)])

    assert code == 0
    assert str(misfiled) not in [row["path"] for row in read_csv_rows(run_dir / "splits.csv")]
    assert len(read_csv_rows(run_dir / "splits.csv")) == 30
    skipped = {row["path"]: row["reason"] for row in read_csv_rows(run_dir / "skipped.csv")}
    assert skipped == {str(misfiled): "excluded by picked.csv (label_issue)"}
    assert misfiled.exists(), "left out, never deleted"


def test_exclude_with_splits_from_a_run_that_left_the_images_out_warns_of_nothing(
    tmp_path: Path, tiny_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    listing = tmp_path / "drop.csv"
    listing.write_text("path\nred/red_003.jpg\nnot/there.jpg\n")
    options = ["--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0",
               "--frozen-epochs", "1", "--finetune-epochs", "0", "--no-report", "--no-progress", "--no-audit",
               "--exclude", str(listing)]
    assert main(["train", str(data), "--output", str(tmp_path / "first"), *options]) == 0
    caplog.clear()

    assert main(["train", str(data), "--output", str(tmp_path / "second"), "--splits-from", str(tmp_path / "first"),
                 *options]) == 0

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "drop.csv" in r.getMessage()]
    # red_003.jpg exists but the first run left it out already: only the path naming nothing is suspect.
    assert warnings == [f"1 paths listed in {listing} name no file (in {data} or the working folder); they are ignored"]
    assert len(read_csv_rows(tmp_path / "second" / "splits.csv")) == 23


def test_exclude_relative_paths_are_read_from_the_data_folder(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    listing = tmp_path / "drop.csv"
    listing.write_text("path,note\nred/red_003.jpg,blurry\nnot/there.jpg,gone\n")
    result = audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights, **{"data.exclude": str(listing)})))
    assert str(data / "red" / "red_003.jpg") not in result.images.paths and len(result.images.paths) == 23
    assert result.skipped == [(str(data / "red" / "red_003.jpg"), "excluded by drop.csv")]


def test_exclude_matches_when_the_data_path_goes_through_a_parent(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    listing = tmp_path / "drop.csv"
    listing.write_text(f"path\n{data / 'red' / 'red_003.jpg'}\n")
    options = tiny_audit_options(tmp_path / "audit", tiny_weights, **{"data.exclude": str(listing)})
    result = audit("../data", AuditConfig.from_options(options))
    assert len(result.images.paths) == 23
    assert [reason for _, reason in result.skipped] == ["excluded by drop.csv"]


@pytest.mark.parametrize(("content", "message"), [
    (None, "not found; --exclude takes a CSV file with a path column"),
    ("file,reason\na.jpg,x\n", "has no path column (its columns: file, reason)"),
])
def test_an_unusable_exclude_file_is_a_one_line_error(
    content: str | None, message: str, tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=4)
    listing = tmp_path / "list.csv"
    if content is not None:
        listing.write_text(content)
    code = main(["train", str(data), "--output", str(tmp_path / "run"), "--model", "test_efficientnet",
                 "--weights", str(tiny_weights), "--exclude", str(listing), "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error


@pytest.fixture
def everything_found(tmp_path: Path, tiny_weights: Path) -> Path:
    """An audit that finds one of each kind: a flipped label, a copy across classes, an outlier."""
    data = make_folder(tmp_path / "data", per_class=15, classes=("blue", "green", "red"))
    make_image(data / "blue" / "was_red.jpg", COLOURS["red"], seed=800)
    shutil.copyfile(data / "green" / "green_001.jpg", data / "red" / "green_misfiled.jpg")
    stripes = np.zeros((40, 40, 3), np.uint8)
    stripes[::4] = 255
    Image.fromarray(stripes).save(data / "green" / "screenshot.png")
    audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights)))
    return tmp_path / "audit"


def test_the_page_is_self_contained_and_shows_each_finding_beside_what_to_compare_it_with(everything_found: Path) -> None:
    page = (everything_found / "audit.html").read_text(encoding="utf-8")
    assert re.search(r'(src|href)="(?!data:)', page) is None, "nothing may load from outside the file"
    for section in ("summary", "classes", "label_issues", "duplicates", "outliers"):
        assert f'id="{section}"' in page
    suspect = page.split('id="label_issues"')[1].split('id="duplicates"')[0]
    assert 'alt="suspect blue"' in suspect and 'alt="typical blue"' in suspect and 'alt="typical red"' in suspect
    assert "Label quality is the probability that a model which never saw the image gives it its label" in suspect
    pairs = page.split('id="duplicates"')[1].split('id="outliers"')[0]
    assert "green_misfiled.jpg" in pairs and "green_001.jpg" in pairs and "identical bytes" in pairs
    outliers = page.split('id="outliers"')[1]
    assert "screenshot.png" in outliers and "The outlier score is how far an image&#x27;s features lie" in outliers
    median = float(np.median(list(map(float, (r["outlier_score"] for r in read_csv_rows(everything_found / "scores.csv"))))))
    assert f"the median image here scores {median:.3f}" in outliers


def test_each_classes_typical_images_are_shown_once_not_on_every_row(tmp_path: Path, tiny_weights: Path) -> None:
    from transferkit.audit.page import OUTLIERS_OPEN

    data = make_folder(tmp_path / "data", per_class=15, classes=("blue", "green", "red"))
    for n in range(OUTLIERS_OPEN + 3):  # more odd images than the section shows open
        stripes = np.zeros((40, 40, 3), np.uint8)
        stripes[n % 4::4 + n % 3] = 255 - 10 * n
        Image.fromarray(stripes).save(data / "green" / f"screenshot{n}.png")
    result = audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights)))
    outliers = result.html_file.read_text(encoding="utf-8").split('id="outliers"')[1]
    flagged = result.of_kind("outlier")
    assert len(flagged) > OUTLIERS_OPEN, "the test needs more outliers than are shown open"
    opened, folded = outliers.split('id="more_outliers"')
    assert opened.count('alt="outlier ') == OUTLIERS_OPEN, "the most unusual shown open, in score order"
    shown = re.findall(r'alt="outlier [a-z]+" title="([^"]+)"', opened)
    assert shown == [f.path for f in flagged[:OUTLIERS_OPEN]], "the most unusual first"
    assert f"{len(flagged) - OUTLIERS_OPEN} more, less unusual" in folded
    for colour in ("blue", "green", "red"):
        assert outliers.count(f'alt="typical {colour}"') <= TYPICAL, f"{colour}'s typical images repeat"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package")
def test_the_page_renders_in_a_real_browser_with_every_thumbnail_decoded(everything_found: Path, tmp_path: Path) -> None:
    page = (everything_found / "audit.html").read_text(encoding="utf-8")
    rendered = render_in_chromium(page, tmp_path)
    assert rendered["images"] == page.count("<img ") and rendered["images"] >= 10
    assert rendered["decoded"] == rendered["images"]
    assert rendered["sections"] == 5


def test_train_audits_its_own_images_and_the_report_links_the_audit(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=12, classes=("blue", "green", "red"))
    # One photo filed under two classes: train lists it in duplicates.csv, the audit as a conflict.
    shutil.copyfile(data / "blue" / "blue_000.jpg", data / "red" / "blue_000_misfiled.jpg")
    run_dir = tmp_path / "run"
    options = ["--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "64", "--num-workers",
               "0", "--frozen-epochs", "2", "--finetune-epochs", "0", "--output", str(run_dir), "--no-progress"]

    assert main(["train", str(data), *options, "--audit", "--report"]) == 0

    printed = capsys.readouterr().out
    summary = json.loads((run_dir / "audit" / "audit.json").read_text())
    splits = read_csv_rows(run_dir / "splits.csv")
    assert summary["images"] == len(splits) == 37, "the audit looks at the run's own images"
    # The tiny random backbone finds plain colours near-identical; the byte-identical pair is certain.
    assert summary["counts"]["identical_groups"] == 1 and summary["counts"]["label_conflict"] >= 1
    assert any(text.startswith("audit of 37 images:") for text in printed.splitlines())
    assert f"run folder: {run_dir} (audit: audit/audit.html)" in printed.splitlines()
    page = (run_dir / "report.html").read_text()
    assert 'id="audit"' in page and "file://" not in page, "the report is mailed alone: the audit is embedded"
    embedded = html.unescape(page.split('srcdoc="')[1].split('"')[0])
    assert embedded == (run_dir / "audit" / "audit.html").read_text(encoding="utf-8")

    assert main(["train", str(data), *options[:-3], "--output", str(tmp_path / "quiet"), "--no-audit"]) == 0
    assert not (tmp_path / "quiet" / "audit").exists()


def test_the_audit_reads_well_in_a_notebook_and_as_a_dataframe(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=12, classes=("blue", "green", "red"))
    make_image(data / "blue" / "was_red.jpg", COLOURS["red"], seed=800)
    result = audit(data, AuditConfig.from_options(tiny_audit_options(tmp_path / "audit", tiny_weights)))

    assert len(repr(result)) < 300 and result.line() in repr(result)
    table = result.to_pandas()
    scores = read_csv_rows(result.output / "scores.csv")
    assert list(table.columns[:6]) == list(scores[0])
    assert list(table["path"]) == [row["path"] for row in scores]
    assert np.allclose(table["label_quality"], [float(row["label_quality"]) for row in scores], atol=1e-6)
    assert np.allclose(table[["p_blue", "p_green", "p_red"]].sum(axis=1), 1, atol=1e-5)
    findings = dict(zip(table["path"], table["findings"]))
    for row in read_csv_rows(result.csv_file):
        for path in filter(None, (row["path"], row["paired_path"])):
            assert row["kind"] in findings[path].split(", "), (row, findings[path])
    assert sum(bool(kinds) for kinds in table["findings"]) >= 1

    page = result._repr_html_()
    assert html.escape(result.line()) in page
    assert all(f"<th>{name}</th>" in page for name in result.classes)
    first = result.findings[0]
    assert f"<td>{first.kind}</td><td>{html.escape(Path(first.path).name)}</td>" in page
    assert page.count("<tr>") == len(result.classes) + 1 + min(len(result.findings), 20)
