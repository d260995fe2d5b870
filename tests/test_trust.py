"""Calibrated confidence and "none of these": the temperature, the unknown score and its
threshold, fitted by train and by ``transferkit calibrate``, carried by the model folder and
every export, applied by predict, evaluate and serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from scipy.spatial.distance import cdist

from conftest import make_folder, run_cli_without_torch, tiny_config
from transferkit import train
from transferkit.trust.temperature import fit_calibration, fit_temperature, mean_log_loss
from transferkit.cli import main
from transferkit.data.images import load_image, resize_side
from transferkit.commands.evaluate import evaluate
from transferkit.commands.predict import predict
from transferkit.commands.export import export
from transferkit.trust.unknown import bank_indices, fit_threshold, unknown_scores
from transferkit.run.folder import RunFolder


def synthetic_logits(scale: float, seed: int = 0, images: int = 600, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(true logits), and those logits times ``scale``: a model that is
    over-confident for a scale above 1, under-confident below."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0, 2, (images, classes))
    probabilities = np.exp(true) / np.exp(true).sum(axis=1, keepdims=True)
    targets = np.array([rng.choice(classes, p=row) for row in probabilities])
    return true * scale, targets


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_the_fitted_temperature_is_the_direct_minimum_of_the_log_loss(scale: float) -> None:
    logits, targets = synthetic_logits(scale)

    temperature = fit_temperature(logits, targets)

    grid = np.exp(np.linspace(-3, 3, 60001))  # steps of 1e-4 in log T
    losses = [mean_log_loss(logits, targets, t) for t in grid]
    assert temperature == pytest.approx(grid[int(np.argmin(losses))], rel=2e-4)
    assert mean_log_loss(logits, targets, temperature) <= min(losses) + 1e-9
    # The labels were drawn from the unscaled logits, so the temperature undoes the scale.
    assert temperature == pytest.approx(scale, rel=0.25)
    found = fit_calibration(logits, targets, "synthetic")
    assert found.ece_after < found.ece_before and found.log_loss_after < found.log_loss_before


def test_the_threshold_keeps_the_stated_share_of_in_distribution_scores() -> None:
    scores = np.random.default_rng(1).gamma(2.0, size=1000)
    for keep in (0.5, 0.9, 0.95, 0.99, 1.0):
        threshold, kept = fit_threshold(scores, keep)
        assert kept == np.mean(scores <= threshold) and keep <= kept < keep + 0.002
        # Halfway to the next score: a small rounding of either image's score keeps the same images.
        kept_scores, other_scores = scores[scores <= threshold], scores[scores > threshold]
        if len(other_scores):
            assert threshold - kept_scores.max() == pytest.approx(other_scores.min() - threshold)
    # With nothing above to go halfway to, the threshold is the highest score the share keeps.
    assert fit_threshold(scores, 1.0) == (scores.max(), 1.0)
    assert fit_threshold(np.full(10, 0.3), 0.95) == (0.3, 1.0)
    assert fit_threshold(np.array([0.2]), 0.95) == (0.2, 1.0)
    # An infinite score (an image no training image resembles) is not halfway to anything.
    assert fit_threshold(np.array([0.1, 0.2, np.inf]), 0.6) == (0.2, pytest.approx(2 / 3))


def test_the_knn_score_is_the_cosine_distance_to_the_kth_nearest_training_image() -> None:
    rng = np.random.default_rng(2)
    bank, pooled = rng.normal(size=(50, 16)), rng.normal(size=(7, 16))
    normalised = torch.nn.functional.normalize(torch.from_numpy(bank).float(), dim=1)

    scores = unknown_scores("knn", torch.zeros(7, 3), torch.from_numpy(pooled).float(), normalised, neighbours=5)

    expected = np.sort(cdist(pooled, bank, metric="cosine"), axis=1)[:, 4]
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-5)


def test_the_knn_sample_keeps_every_class_in_its_proportion() -> None:
    targets = np.array([0] * 6000 + [1] * 3000 + [2])

    rows = bank_indices(targets, size=900, seed=0)

    counts = np.bincount(targets[rows], minlength=3)
    assert list(counts) == [600, 300, 1], "a class of one image is kept, and the others in proportion"
    assert len(set(rows.tolist())) == len(rows)
    assert list(bank_indices(targets[:50], size=900)) == list(range(50)), "below the size every image is kept"


def mislabelled_folder(root: Path) -> Path:
    """Three colours, with a few images of each filed under the next class, so the validation
    split has mistakes and the temperature is finite."""
    folder = make_folder(root, per_class=30, classes=("blue", "green", "red"))
    names = ["blue", "green", "red"]
    for k, name in enumerate(names):
        for image in sorted((folder / name).iterdir())[:5]:
            image.rename(folder / names[(k + 1) % 3] / f"moved_{image.name}")
    return folder


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    root = tmp_path_factory.mktemp("noisy")
    run_dir = root / "run"
    train(mislabelled_folder(root / "data"), tiny_config(run_dir, tiny_weights, **{"data.split": (0.5, 0.5, 0.0)}))
    return run_dir


def noise_image(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def val_paths(run_dir: Path) -> list[str]:
    return [path for path, _ in RunFolder(run_dir).read_splits(["blue", "green", "red"])["val"]]


def test_train_fits_the_temperature_on_val_and_every_output_uses_it(noisy_run: Path) -> None:
    extra = json.loads((noisy_run / "model" / "config.json").read_text())["transferkit"]
    calibration = extra["calibration"]
    assert calibration["fitted_on"] == "val" and 0.01 < calibration["temperature"] < 100
    assert calibration["temperature"] != 1.0
    assert calibration["log_loss_after"] <= calibration["log_loss_before"]
    assert calibration["ece_after"] < calibration["ece_before"]

    val = json.loads((noisy_run / "evaluation" / "val" / "metrics.json").read_text())
    assert val["log_loss"] == pytest.approx(calibration["log_loss_after"], abs=1e-4)
    assert val["expected_calibration_error"] == pytest.approx(calibration["ece_after"], abs=1e-4)
    assert val["calibration"]["uncalibrated_expected_calibration_error"] == pytest.approx(calibration["ece_before"], abs=1e-4)
    assert json.loads((noisy_run / "metrics.json").read_text())["calibration"] == calibration

    # predict's probabilities are the timm model's softmax of logits / T, fed by hand.
    paths = val_paths(noisy_run)[:6]
    model = timm.create_model(f"local-dir:{noisy_run / 'model'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    batch = torch.stack([transform(load_image(p, resize_side(extra["preprocessing"]))) for p in paths])
    with torch.no_grad():
        expected = (model(batch) / calibration["temperature"]).softmax(dim=1).numpy()
    predicted = predict(noisy_run, paths, top_k=3).predictions
    for prediction, row in zip(predicted, expected):
        np.testing.assert_allclose(prediction.probabilities, np.sort(row)[::-1], atol=1e-4)


def test_evaluate_prints_the_calibration_error_before_and_after(noisy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(noisy_run), "--split", "val", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    calibration = json.loads((noisy_run / "model" / "config.json").read_text())["transferkit"]["calibration"]
    assert f"calibration error (ECE)  {calibration['ece_after']:.4f}" in printed
    assert f"ECE before calibration   {calibration['ece_before']:.4f}" in printed
    assert "answered unknown" in printed


def test_predict_answers_unknown_for_images_unlike_the_training_images(
    noisy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unknown = json.loads((noisy_run / "model" / "config.json").read_text())["transferkit"]["unknown"]
    assert unknown["method"] == "knn" and unknown["keep"] == 0.95 and unknown["kept"] >= 0.95
    noise = [str(noise_image(tmp_path / f"noise_{i}.png", seed=i)) for i in range(3)]
    familiar = val_paths(noisy_run)

    result = predict(noisy_run, noise + familiar)

    answers = {p.path: p for p in result.predictions}
    assert all(answers[path].answer == "unknown" and answers[path].unknown for path in noise)
    assert all(answers[path].unknown_score > unknown["threshold"] for path in noise)
    kept = [not answers[path].unknown for path in familiar]
    assert np.mean(kept) == pytest.approx(unknown["kept"], abs=1e-6)  # the same images the threshold was set on
    assert all(answers[path].answer == answers[path].labels[0] for path in familiar if not answers[path].unknown)

    assert main(["predict", str(noisy_run), *noise, "--no-reject", "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["answer"] for p in printed] == [answers[path].labels[0] for path in noise]
    assert [p["unknown_score"] for p in printed] == pytest.approx([answers[path].unknown_score for path in noise], abs=1e-5)


def test_an_onnx_export_applies_the_temperature_and_threshold_without_torch(noisy_run: Path, tmp_path: Path) -> None:
    onnx_file = export(noisy_run, output=tmp_path / "model.onnx").path
    images = [str(noise_image(tmp_path / "noise.png")), *val_paths(noisy_run)[:4]]
    completed = run_cli_without_torch(["predict", str(onnx_file), *images, "--format", "json", "--top-k", "3"])

    assert completed.returncode == 0, completed.stderr
    from_file = json.loads(completed.stdout)["predictions"]
    from_run = predict(noisy_run, images, top_k=3).predictions
    assert [p["answer"] for p in from_file] == [p.answer for p in from_run]
    assert from_file[0]["answer"] == "unknown"
    for answered, expected in zip(from_file, from_run):
        assert answered["unknown_score"] == pytest.approx(expected.unknown_score, abs=1e-5)
        assert [t["probability"] for t in answered["top_k"]] == pytest.approx(expected.probabilities, abs=1e-5)


def test_calibrate_refits_on_another_labelled_folder(noisy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(noisy_run, run_dir)
    before = json.loads((run_dir / "model" / "config.json").read_text())["transferkit"]
    field = mislabelled_folder(tmp_path / "field")

    assert main(["calibrate", str(run_dir), str(field), "--unknown-keep", "0.9", "--no-progress"]) == 0

    printed = capsys.readouterr().out
    after = json.loads((run_dir / "model" / "config.json").read_text())["transferkit"]
    assert after["calibration"]["fitted_on"] == str(field) and after["calibration"]["images"] == 90
    assert after["calibration"]["temperature"] != before["calibration"]["temperature"]
    assert after["unknown"]["keep"] == 0.9 and 0.9 <= after["unknown"]["kept"] < 0.92
    assert f"temperature   {after['calibration']['temperature']:.4f}" in printed
    assert json.loads((run_dir / "metrics.json").read_text())["calibration"] == after["calibration"]
    # The new temperature is what the model now answers with.
    evaluation = evaluate(run_dir, field, output=tmp_path / "evaluation")
    assert evaluation.metrics["log_loss"] == pytest.approx(after["calibration"]["log_loss_after"], abs=1e-4)
    assert evaluation.metrics["unknown"]["kept"] == pytest.approx(after["unknown"]["kept"])


def test_calibrate_problems_are_one_line_each(noisy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(noisy_run), "--unknown-keep", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --unknown-keep must be in (0, 1], got 0.0"

    run_dir = tmp_path / "run"
    shutil.copytree(noisy_run, run_dir)
    (run_dir / "model" / "unknown_bank.safetensors").unlink()
    assert main(["predict", str(run_dir), str(noise_image(tmp_path / "noise.png"))]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "unknown_bank.safetensors is missing" in error and "transferkit calibrate" in error
    # ... and the command it names does fix it: the features are taken again from the training images.
    assert main(["calibrate", str(run_dir), "--no-progress"]) == 0
    assert (run_dir / "model" / "unknown_bank.safetensors").is_file()
    assert predict(run_dir, [str(tmp_path / "noise.png")]).predictions[0].answer == "unknown"


def test_without_calibration_or_unknown_score_the_model_predicts_as_before(tiny_weights: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, tiny_weights, calibrate=False, unknown_score="none")
    train(mislabelled_folder(tmp_path / "data"), config)

    extra = json.loads((run_dir / "model" / "config.json").read_text())["transferkit"]
    assert "calibration" not in extra and "unknown" not in extra
    assert not (run_dir / "model" / "unknown_bank.safetensors").exists()
    prediction = predict(run_dir, [str(noise_image(tmp_path / "noise.png"))]).predictions[0]
    assert prediction.unknown_score is None and prediction.answer == prediction.labels[0]
    import onnx

    outputs = [o.name for o in onnx.load(str(export(run_dir, output=tmp_path / "model.onnx").path)).graph.output]
    assert outputs == ["logits"]


def test_the_report_shows_calibration_before_and_after(noisy_run: Path, tmp_path: Path) -> None:
    from transferkit.reporting.report import write_report

    page = write_report([noisy_run], tmp_path / "report.html").read_text()

    evaluation = json.loads((noisy_run / "evaluation" / "val" / "metrics.json").read_text())
    section = page[page.index('id="trust"'):]
    section = section[: section.index("</table>")]
    assert f"<td>{evaluation['calibration']['uncalibrated_expected_calibration_error']:.4f}</td>" in section
    assert f"<td>{evaluation['expected_calibration_error']:.4f}</td>" in section
    assert f"{evaluation['unknown']['unknown']} of {evaluation['unknown']['images']}" in section


def test_heat_map_overlays_state_the_calibrated_probability_predict_prints(noisy_run: Path) -> None:
    pytest.importorskip("pytorch_grad_cam")
    from transferkit.reporting.explain import load_explainer

    paths = val_paths(noisy_run)[:4]

    explained = load_explainer(noisy_run).explain(paths)

    answers = predict(noisy_run, paths, top_k=1).predictions
    assert [e.label for e in explained] == [a.labels[0] for a in answers]
    assert [e.probability for e in explained] == pytest.approx([a.probabilities[0] for a in answers], abs=1e-4)
