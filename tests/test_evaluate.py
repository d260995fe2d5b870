from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn import metrics as sk
from torchmetrics.classification import MulticlassCalibrationError

from conftest import COLOURS, make_folder, make_image
from transferkit._io import read_csv_rows
from transferkit.cli import main
from transferkit.data.images import load_image, resize_side
from transferkit.errors import DataError
from transferkit.commands.evaluate import evaluate
from transferkit.commands.predict import predict
from transferkit.inference.metrics import compute_metrics
from transferkit.inference.loading import load_predictor

CLASSES = ["cat", "dog", "fox", "owl", "yak"]


def random_predictions(seed: int = 0, size: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities for five classes; class 3 ('owl') never occurs in the labels."""
    rng = np.random.default_rng(seed)
    targets = rng.choice([0, 1, 2, 4], size=size)
    logits = rng.normal(0, 1.5, (size, len(CLASSES)))
    logits[np.arange(size), targets] += 1.5  # better than chance, far from perfect
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities.astype(np.float32), targets


def test_every_metric_equals_scikit_learn_with_a_class_absent_from_the_labels() -> None:
    probabilities, targets = random_predictions()
    predictions = probabilities.argmax(axis=1)
    assert 3 in predictions and 3 not in targets, "the case under test: predicted but never true"

    metrics = compute_metrics(probabilities, targets, CLASSES)

    assert metrics["accuracy"] == pytest.approx(sk.accuracy_score(targets, predictions))
    assert metrics["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(targets, predictions))
    assert metrics["top_k_accuracy"]["3"] == pytest.approx(
        sk.top_k_accuracy_score(targets, probabilities, k=3, labels=range(5))
    )
    for average in ("macro", "weighted"):
        assert metrics[f"{average}_f1"] == pytest.approx(
            sk.f1_score(targets, predictions, average=average, zero_division=0)
        )
    assert metrics["macro_precision"] == pytest.approx(sk.precision_score(targets, predictions, average="macro", zero_division=0))
    assert metrics["macro_recall"] == pytest.approx(sk.recall_score(targets, predictions, average="macro", zero_division=0))
    assert metrics["log_loss"] == pytest.approx(sk.log_loss(targets, probabilities.astype(np.float64), labels=range(5)), rel=1e-6)
    assert metrics["confusion_matrix"] == sk.confusion_matrix(targets, predictions, labels=range(5)).tolist()

    precision, recall, f1, support = sk.precision_recall_fscore_support(
        targets, predictions, labels=range(5), zero_division=0
    )
    for i, row in enumerate(metrics["per_class"]):
        assert row["class"] == CLASSES[i] and row["support"] == support[i]
        if i == 3:
            # Never true but sometimes predicted: recall is undefined and says so instead of a
            # made-up zero; precision and F1 are a real zero (every such prediction is wrong).
            assert row["support"] == 0 and row["recall"] is None
            assert row["precision"] == 0.0 and row["f1"] == 0.0
        else:
            assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[i], recall[i], f1[i]))

    rows = np.array(metrics["confusion_matrix_normalized"])
    assert rows[3].tolist() == [0.0] * 5
    np.testing.assert_allclose(rows[[0, 1, 2, 4]].sum(axis=1), 1.0, atol=1e-5)

    reference_ece = MulticlassCalibrationError(num_classes=5, n_bins=15, norm="l1")(
        torch.from_numpy(probabilities), torch.from_numpy(targets)
    )
    assert metrics["expected_calibration_error"] == pytest.approx(float(reference_ece), abs=1e-6)
    assert sum(metrics["reliability"]["count"]) == len(targets)


def test_most_confused_pairs_and_highest_loss_images_are_the_real_ones() -> None:
    probabilities, targets = random_predictions(seed=1, size=200)
    paths = [f"img_{i}.jpg" for i in range(len(targets))]
    metrics = compute_metrics(probabilities, targets, CLASSES, paths)

    confusion = sk.confusion_matrix(targets, probabilities.argmax(axis=1), labels=range(5))
    np.fill_diagonal(confusion, 0)
    top = metrics["most_confused"][0]
    assert top["count"] == confusion.max()
    assert confusion[CLASSES.index(top["label"]), CLASSES.index(top["predicted"])] == confusion.max()
    counts = [r["count"] for r in metrics["most_confused"]]
    assert counts == sorted(counts, reverse=True)

    losses = -np.log(probabilities[np.arange(len(targets)), targets])
    worst = metrics["highest_loss"]
    assert worst[0]["path"] == paths[int(losses.argmax())]
    assert worst[0]["loss"] == pytest.approx(float(losses.max()), rel=1e-5)
    assert [w["loss"] for w in worst] == sorted((w["loss"] for w in worst), reverse=True)


def test_top_k_is_reported_only_where_it_means_something() -> None:
    probabilities = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])
    metrics = compute_metrics(probabilities, [0, 0, 1], ["a", "b"])
    assert metrics["top_k_accuracy"] == {}, "top-3 of two classes is always 1.0"
    assert metrics["accuracy"] == pytest.approx(2 / 3)


# --- with a trained run -----------------------------------------------------------------------


def eager_probabilities(run_dir: Path, paths: list[str]) -> np.ndarray:
    """The saved model rebuilt through timm alone, fed by hand, its logits divided by the saved
    temperature: the reference for every output."""
    model = timm.create_model(f"local-dir:{run_dir / 'model'}", pretrained=True).eval()
    extra = json.loads((run_dir / "model" / "config.json").read_text())["transferkit"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    batch = torch.stack([transform(load_image(p, resize_side(extra["preprocessing"]))) for p in paths])
    with torch.no_grad():
        return (model(batch) / extra["calibration"]["temperature"]).softmax(dim=1).numpy()


def test_predict_equals_the_models_own_forward_pass(trained_run: Path, tmp_path: Path) -> None:
    paths = [row["path"] for row in read_csv_rows(trained_run / "splits.csv")][::7]

    result = predict(trained_run, paths, top_k=2)

    reference = eager_probabilities(trained_run, paths)
    assert [p.path for p in result.predictions] == paths
    for prediction, expected in zip(result.predictions, reference):
        order = np.argsort(-expected)[:2]
        assert prediction.labels == [["blue", "green", "red"][i] for i in order]
        np.testing.assert_allclose(prediction.probabilities, expected[order], atol=1e-4)


def test_predict_skips_unreadable_files_and_lists_them(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "incoming"
    good = make_image(folder / "a.jpg", COLOURS["red"], seed=5)
    (folder / "notes.jpg").write_text("not an image")
    missing = tmp_path / "gone.png"

    code = main(["predict", str(trained_run), str(folder), str(missing), "--format", "json", "--top-k", "3"])

    output = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [p["path"] for p in output["predictions"]] == [str(good)]
    assert [len(p["top_k"]) for p in output["predictions"]] == [3]
    assert sum(t["probability"] for t in output["predictions"][0]["top_k"]) == pytest.approx(1.0, abs=1e-4)
    assert {Path(s["path"]).name for s in output["skipped"]} == {"notes.jpg", "gone.png"}


def test_predict_writes_csv_with_one_row_per_image(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = [make_image(tmp_path / f"{i}.png", COLOURS["blue"], seed=i) for i in range(3)]
    assert main(["predict", str(trained_run / "model"), *map(str, images), "--format", "csv", "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,answer,unknown_score,unknown,label_1,probability_1"
    for line, prediction in zip(lines[1:], predict(trained_run, images, top_k=1)):
        assert line.split(",")[1:4] == [prediction.answer, f"{prediction.unknown_score:.6f}", str(prediction.unknown).lower()]
    assert [line.split(",")[0] for line in lines[1:]] == [str(p) for p in images]


def test_evaluate_on_a_labelled_folder_with_some_of_the_classes(trained_run: Path, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "field", per_class=6, classes=("green", "red"))

    evaluation = evaluate(trained_run, folder, output=tmp_path / "out")

    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["images"] == 12 == evaluation.metrics["images"]
    assert [r["support"] for r in written["per_class"]] == [0, 6, 6]
    probabilities = eager_probabilities(trained_run, evaluation.paths)
    expected_accuracy = float((probabilities.argmax(axis=1) == evaluation.targets).mean())
    assert written["accuracy"] == pytest.approx(expected_accuracy)
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,label,predicted,confidence,label_probability,loss,unknown_score,unknown" and len(rows) == 13


def test_evaluate_rejects_class_folders_the_model_does_not_know(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_folder(tmp_path / "field", per_class=2, classes=("blue",))
    make_image(folder / "grene" / "x.jpg", COLOURS["green"], seed=1)
    make_image(folder / "purple" / "y.jpg", COLOURS["red"], seed=2)

    with pytest.raises(DataError, match=r"grene \(rename to green\?\), purple"):
        evaluate(trained_run, folder)
    assert main(["evaluate", str(trained_run), str(folder)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert message.endswith("grene (rename to green?), purple; the model knows blue, green, red; "
                            "rename or remove those folders")


def test_evaluate_with_flip_tta_on_the_runs_own_test_split(trained_run: Path) -> None:
    plain = evaluate(trained_run, split="test")
    flipped = evaluate(trained_run, split="test", tta=True)
    assert flipped.paths == plain.paths
    assert (trained_run / "evaluation" / "test-tta" / "metrics.json").is_file()
    assert not np.allclose(flipped.probabilities, plain.probabilities), "TTA must change the outputs"
    np.testing.assert_allclose(flipped.probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_classifier_loads_from_the_run_or_its_model_folder(trained_run: Path) -> None:
    assert load_predictor(trained_run).classes == load_predictor(trained_run / "model").classes == ["blue", "green", "red"]


def test_a_runs_model_folder_is_evaluated_on_the_runs_split_and_a_lone_one_asks_for_data(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from_run = evaluate(trained_run, split="test")
    from_model = evaluate(trained_run / "model", split="test")
    assert from_model.paths == from_run.paths
    np.testing.assert_allclose(from_model.probabilities, from_run.probabilities, atol=1e-6)
    assert not (trained_run / "model" / "evaluation").exists(), "evaluations go to the run, not into the model"

    alone = tmp_path / "shipped"
    shutil.copytree(trained_run / "model", alone)
    assert main(["evaluate", str(alone)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and message.endswith(f"transferkit evaluate {alone} DATA")
    folder = make_folder(tmp_path / "field", per_class=2, classes=("blue", "red"))
    assert evaluate(alone, folder).metrics["images"] == 4


def test_results_read_well_in_a_notebook_and_as_dataframes(trained_run: Path, tmp_path: Path) -> None:
    evaluation = evaluate(trained_run, split="test")
    assert len(repr(evaluation)) < 200 and "accuracy" in repr(evaluation)
    table = evaluation.to_pandas()
    written = read_csv_rows(trained_run / "evaluation" / "test" / "predictions.csv")
    assert list(table["path"]) == [row["path"] for row in written]
    assert list(table["predicted"]) == [row["predicted"] for row in written]
    np.testing.assert_allclose(table[["p_blue", "p_green", "p_red"]].to_numpy(), evaluation.probabilities)
    page = evaluation._repr_html_()
    assert "Confusion matrix" in page and page.count("<tr>") >= 1 + len(evaluation.classes)

    images = [make_image(tmp_path / f"{i}.png", COLOURS["green"], seed=i) for i in range(3)]
    result = predict(trained_run, [*images, tmp_path / "missing.png"], top_k=2)
    assert len(result) == 3 and result[0].path == str(images[0]) and len(result.skipped) == 1
    assert [p.answer for p in result] == list(result.to_pandas()["answer"])
    assert list(result.to_pandas().columns[:6]) == ["path", "answer", "unknown_score", "unknown", "label_1", "probability_1"]
    assert "3 images" in repr(result) and "1 skipped" in repr(result)
    assert result._repr_html_().count("<tr>") == 4


def test_predictions_csv_says_which_images_were_answered_unknown(trained_run: Path, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "field", per_class=6, classes=("blue", "green", "red"))
    # Photos unlike any training image, filed under a class: the ones "none of these" is for.
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(folder / "blue" / f"noise_{i}.png")

    evaluation = evaluate(trained_run, folder, output=tmp_path / "out")

    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = read_csv_rows(tmp_path / "out" / "predictions.csv")
    threshold = load_predictor(trained_run).unknown["threshold"]
    assert [row["unknown"] for row in rows] == ["true" if float(row["unknown_score"]) > threshold else "false" for row in rows]
    answered = sum(row["unknown"] == "true" for row in rows)
    assert answered == written["unknown"]["unknown"] > 0
    assert any(row["unknown"] == "true" for row in rows if "noise_" in row["path"])
    assert list(evaluation.to_pandas()["unknown"]) == [row["unknown"] == "true" for row in rows]
