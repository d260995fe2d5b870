"""Heat maps (explain.py) on real tiny timm models and trained runs, and predict --explain."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import COLOURS, make_image
from transferkit.cli import main
from transferkit.data.loaders import resolve_preprocessing
from transferkit.errors import ConfigError
from transferkit.commands.predict import predict
from transferkit.reporting.explain import METHODS, OVERLAY_SIDE, Explainer, ExplainUnavailable, load_explainer, write_overlays
from transferkit.inference.predictor import Predictor, torch_forward
from transferkit.inference.loading import load_run_model

pytest.importorskip("pytorch_grad_cam")


def _untrained(name: str) -> tuple[torch.nn.Module, Predictor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    preprocessing = dict(resolve_preprocessing(model))
    preprocessing["input_size"] = tuple(preprocessing["input_size"])
    return model, Predictor(torch_forward(model, "cpu"), ["a", "b", "c"], preprocessing)


@pytest.mark.parametrize(("name", "layer"), [
    ("test_efficientnet", "feature_map"),
    ("resnet10t", "feature_map"),
    ("test_convnext", "feature_map"),
    ("test_mambaout", "feature_map"),  # its map is NHWC
    ("test_vit_relpos", "feature_map"),  # a ViT that averages its tokens: the last tokens, as a grid
    # a ViT's patch tokens reach the logits only through the class token: the map is taken
    # where the last block reads them
    ("test_vit", "model.blocks.5.norm1"),
])
def test_every_family_gets_a_map_at_input_resolution_for_its_top_label(
    name: str, layer: str, tmp_path: Path
) -> None:
    model, predictor = _untrained(name)
    paths = [str(make_image(tmp_path / f"{i}.jpg", (200, 120, 40), seed=i, size=(90, 70))) for i in range(3)]
    explanations = Explainer(model, predictor, "gradcam").explain(paths)
    side = predictor.preprocessing["input_size"][-1]
    top_labels = [p.labels[0] for p in predict(predictor, paths, top_k=1).predictions]
    assert Explainer(model, predictor).layer == layer
    assert [e.path for e in explanations] == paths
    assert [e.label for e in explanations] == top_labels
    for e in explanations:
        assert e.heatmap.shape == (side, side) and e.image.shape == (side, side, 3)
        # An untrained model may have no positive evidence anywhere: an all-zero map is honest, NaN is not.
        assert np.isfinite(e.heatmap).all() and e.heatmap.min() >= 0 and e.heatmap.max() <= 1 + 1e-6


PATCH = 28


def patch_image(path: Path, colour: tuple[int, int, int], row: int, column: int, seed: int) -> Path:
    """A 64 px grey noise image with one coloured square at (row, column)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(128 + rng.normal(0, 20, (64, 64, 3)), 0, 255)
    square = np.array(colour) + rng.normal(0, 20, (PATCH, PATCH, 3))
    pixels[row:row + PATCH, column:column + PATCH] = np.clip(square, 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    """A tiny run that learnt blue / red from a square placed anywhere on grey: the evidence is
    the square and nothing else. 128 px input, so the last map is 4 x 4 cells, not 2 x 2."""
    from conftest import tiny_config
    from transferkit import train

    root = tmp_path_factory.mktemp("patches")
    rng = np.random.default_rng(0)
    for name in ("blue", "red"):
        for i in range(30):
            patch_image(root / "data" / name / f"{i}.png", COLOURS[name], *rng.integers(0, 64 - PATCH, 2), seed=i)
    options = {"data.image_size": 128, "frozen.epochs": 6, "finetune.epochs": 3, "finetune.unfreeze": "all"}
    train(root / "data", tiny_config(root / "run", tiny_weights, **options))
    return root / "run"


def test_the_map_is_hottest_in_the_quarter_holding_the_evidence(patch_run: Path, tmp_path: Path) -> None:
    # The tiny three-colour run, whose classes fill the whole image, failed this: its maps were
    # hottest bottom right wherever the red square was.
    model, predictor = load_run_model(patch_run)
    explainer = Explainer(model, predictor)
    paths = [str(patch_image(tmp_path / f"{q}.png", COLOURS["red"], 36 * (q // 2), 36 * (q % 2), seed=100 + q))
             for q in range(4)]
    side = predictor.preprocessing["input_size"][-1] // 2
    explanations = explainer.explain(paths)
    answers = predict(patch_run, paths, top_k=1).predictions
    assert [e.label for e in explanations] == [a.labels[0] for a in answers]
    assert [e.probability for e in explanations] == pytest.approx([a.probabilities[0] for a in answers], abs=1e-4)
    for quarter, explanation in enumerate(explanations):
        heat = explanation.heatmap
        means = [heat[r * side:(r + 1) * side, c * side:(c + 1) * side].mean() for r in range(2) for c in range(2)]
        assert int(np.argmax(means)) == quarter, f"square in quarter {quarter}, map means {np.round(means, 3)}"


def predictor_input(predictor: Predictor, path: Path) -> np.ndarray:
    from transferkit.data.images import load_image, preprocess_image

    return preprocess_image(load_image(str(path)), predictor.preprocessing)


def test_overlays_are_readable_pngs_named_after_their_images(trained_run: Path, tmp_path: Path) -> None:
    paths = [make_image(tmp_path / folder / "same.jpg", COLOURS["blue"], seed=n) for n, folder in enumerate("ab")]
    explainer = load_explainer(trained_run)
    explanations = explainer.explain([str(p) for p in paths])
    written = write_overlays(explanations, tmp_path / "overlays")
    assert [p.name for p in written] == ["same.png", "same-2.png"]  # two images called alike keep two overlays
    with Image.open(written[0]) as picture:
        assert picture.format == "PNG"
        # two panels of at least OVERLAY_SIDE px under a title: a 64 px input is drawn large enough to read
        assert picture.width >= 2 * OVERLAY_SIDE and picture.height > OVERLAY_SIDE
        pixels = np.asarray(picture.convert("RGB"))
    half = pixels.shape[1] // 2
    assert np.abs(pixels[40:, :half - 8].astype(int) - pixels[40:, half + 8:][:, : half - 8].astype(int)).mean() > 5


def test_predict_explain_writes_one_overlay_per_readable_image(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    make_image(images / "sky.jpg", COLOURS["blue"], seed=1)
    make_image(images / "leaf.jpg", COLOURS["green"], seed=2)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["predict", str(trained_run), str(images), "--explain", str(tmp_path / "why")]) == 0
    assert sorted(p.name for p in (tmp_path / "why").iterdir()) == ["leaf.png", "sky.png"]
    assert "2 heat-map overlays written to" in capsys.readouterr().err


def test_predict_explain_on_an_exported_file_says_to_pass_the_run_folder(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transferkit.commands.export import export

    exported = export(trained_run, output=tmp_path / "model.onnx").path
    image = make_image(tmp_path / "sky.jpg", COLOURS["blue"], seed=1)
    assert main(["predict", str(exported), str(image), "--explain", str(tmp_path / "why")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "pass the run folder" in error[0] and "model.onnx" in error[0]
    assert not (tmp_path / "why").exists()


def test_unknown_method_and_missing_library_are_one_line_errors(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, predictor = load_run_model(trained_run)
    with pytest.raises(ConfigError, match=r"unknown explanation method 'gradcam\+'.*Did you mean: gradcam\+\+"):
        Explainer(model, predictor, "gradcam+")
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # as if grad-cam were not installed
    with pytest.raises(ExplainUnavailable, match=r"pip install 'transferkit\[explain\]'"):
        Explainer(model, predictor)


def test_every_offered_method_runs(trained_run: Path, tmp_path: Path) -> None:
    model, predictor = load_run_model(trained_run)
    path = str(make_image(tmp_path / "x.jpg", COLOURS["green"], seed=3))
    for method in METHODS:
        (explanation,) = Explainer(model, predictor, method).explain([path])
        assert explanation.method == method and np.isfinite(explanation.heatmap).all()
