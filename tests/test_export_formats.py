"""Every export format: the tiny run exported, run in its own runtime, and used by predict,
evaluate and serve as the run folder is. A format whose runtime is not installed here is skipped
with the command that installs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from conftest import run_cli_without_torch, serving
from test_export import val_paths
from transferkit.cli import main
from transferkit.commands.evaluate import evaluate
from transferkit.commands.export import ExportAll, export_all, export_table
from transferkit.commands.predict import predict
from transferkit.commands.serve_app import create_app
from transferkit.export.formats import FORMATS
from transferkit.inference.loading import load_predictor

FLOAT_FORMATS = ["openvino", "litert", "executorch", "pt2"]
"""ONNX and TorchScript have their own tests in test_export.py."""


def require(format: str, quantize: str | None = None) -> None:
    chosen = FORMATS[format]
    if not chosen.installed(quantize):
        pytest.skip(f"{format} needs {', '.join(chosen.missing(chosen.needs(quantize)))}: {chosen.install}")


@pytest.fixture(scope="module")
def exports(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportAll:
    """``export --format all`` of the tiny run, once (LiteRT's conversion alone takes about 15 s).
    The tiny run has 9 validation images, so one image is 11 points: int8 may lose one."""
    return export_all(trained_run, output=tmp_path_factory.mktemp("exports"), max_accuracy_drop=12)


def written(exports: ExportAll, name: str) -> Any:
    return next(result for result in exports.results if result.name == name)


@pytest.mark.parametrize("format", FLOAT_FORMATS)
def test_each_format_agrees_with_the_model_in_its_own_runtime_and_is_a_complete_model(
    format: str, exports: ExportAll, trained_run: Path
) -> None:
    require(format)
    result = written(exports, format)
    assert result.path.is_file() and result.images == len(val_paths(trained_run))
    assert result.max_abs_diff <= 1e-4 and result.max_score_diff is not None and result.max_score_diff <= 1e-4
    assert result.accuracy == result.reference_accuracy and result.unknown_agreement == 1.0
    assert [p.name for p in result.path.parent.iterdir() if p.name.startswith(".")] == [], "no temporary left"

    # The file alone: classes, preprocessing, temperature and threshold come back from it.
    from_file = load_predictor(result.path)
    from_run = load_predictor(trained_run)
    assert from_file.classes == ["blue", "green", "red"] and from_file.preprocessing == from_run.preprocessing
    assert from_file.temperature == from_run.temperature and from_file.unknown == from_run.unknown

    paths = val_paths(trained_run)
    answered, expected = predict(result.path, paths, top_k=3), predict(trained_run, paths, top_k=3)
    assert [p.labels for p in answered.predictions] == [p.labels for p in expected.predictions]
    assert [p.answer for p in answered.predictions] == [p.answer for p in expected.predictions]
    np.testing.assert_allclose([p.probabilities for p in answered.predictions],
                               [p.probabilities for p in expected.predictions], atol=1e-4)

    evaluation = evaluate(result.path, trained_run.parent / "data", output=result.path.parent / f"eval-{format}")
    assert evaluation.metrics["images"] == 60 and [Path(p).name for p, _ in evaluation.skipped] == ["truncated.jpg"]

    if format in ("openvino", "litert"):  # their runtimes need no torch, so neither does the file
        completed = run_cli_without_torch(["predict", str(result.path), paths[0], "--format", "json", "--top-k", "1"])
        assert completed.returncode == 0, completed.stderr
        answered_alone = json.loads(completed.stdout)["predictions"][0]
        assert answered_alone["answer"] == expected.predictions[0].answer
        assert answered_alone["unknown_score"] == pytest.approx(expected.predictions[0].unknown_score, abs=1e-4)

    image = Path(paths[0]).read_bytes()
    with serving(create_app(result.path)) as url:
        response = requests.post(f"{url}/predict", files=[("file", ("x.jpg", image)), ("file", ("y.jpg", image))],
                                 timeout=60)
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
    assert [p["top_k"][0]["label"] for p in served] == [expected.predictions[0].labels[0]] * 2
    assert served[0]["top_k"][0]["probability"] == pytest.approx(expected.predictions[0].probabilities[0], abs=1e-4)


@pytest.mark.parametrize("format", ["onnx", "openvino"])
def test_int8_is_smaller_and_carries_a_threshold_fitted_on_its_own_scores(
    format: str, exports: ExportAll, trained_run: Path
) -> None:
    require(format, "int8")
    result, float_result = written(exports, f"{format} int8"), written(exports, format)
    assert result.size_bytes < 0.7 * float_result.size_bytes
    assert abs(result.accuracy - result.reference_accuracy) * result.images <= 1 + 1e-9
    predictor = load_predictor(result.path)
    assert predictor.info["format"] == f"{format}-int8" and "static int8" in predictor.info["quantization"]
    assert predictor.unknown["threshold"] == pytest.approx(result.threshold)
    _, scores = predictor.scored(val_paths(trained_run))
    assert np.mean(scores <= result.threshold) >= predictor.unknown["keep"], "the file keeps the share it promises"


def test_a_file_that_loses_accuracy_is_refused_in_one_line_and_not_left_behind(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out" / "model.int8.onnx"
    # No accuracy may be lost: static int8 of the tiny model loses one of its 9 validation images.
    code = main(["export", str(trained_run), "--quantize", "int8", "--output", str(target),
                 "--max-accuracy-drop", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "more than --max-accuracy-drop 0" in err and "no file was written" in err
    assert list(target.parent.iterdir()) == []


def test_export_all_writes_every_installed_format_with_one_table(exports: ExportAll) -> None:
    table = export_table(exports.results).splitlines()
    assert table[0].startswith("| format | file | size (MB) |") and len(table) == 2 + len(exports.results)
    assert not exports.failed
    for name, install in exports.missing.items():
        assert install.startswith("pip install"), name
    assert {r.name for r in exports.results} | set(exports.missing) >= {"onnx", "onnx int8", "pt2", *FLOAT_FORMATS}
    assert all(r.path.is_file() for r in exports.results)


def test_a_missing_runtime_is_named_with_its_install_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = next((f for f in FORMATS.values() if f.missing(f.runs_with)), None)
    if absent is None:
        pytest.skip("every runtime is installed here")
    (tmp_path / f"model{absent.suffix}").write_bytes(b"")
    assert main(["predict", str(tmp_path / f"model{absent.suffix}"), str(tmp_path)]) == 2
    assert absent.install in capsys.readouterr().err
