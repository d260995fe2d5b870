from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

from conftest import TINY_MODEL, run_cli_without_torch
from transferkit._io import read_csv_rows
from transferkit.cli import main
from transferkit.commands.evaluate import evaluate
from transferkit.commands.predict import predict
from transferkit.commands.export import export
from transferkit.inference.loading import load_predictor
from transferkit.inference.onnx_runtime import cached_session, onnx_cache_folder, session_forward


def val_paths(run_dir: Path) -> list[str]:
    return [row["path"] for row in read_csv_rows(run_dir / "splits.csv") if row["split"] == "val"]


def test_onnx_export_matches_the_eager_model_and_carries_its_metadata(trained_run: Path, tmp_path: Path) -> None:
    result = export(trained_run, output=tmp_path / "model.onnx")

    assert result.path.is_file() and result.size_bytes == result.path.stat().st_size
    assert result.images == len(val_paths(trained_run))
    assert result.max_abs_diff <= 1e-4 and result.max_score_diff is not None and result.max_score_diff <= 1e-4
    assert result.accuracy == result.reference_accuracy

    proto = onnx.load(str(result.path))
    metadata = json.loads({p.key: p.value for p in proto.metadata_props}["transferkit"])
    assert metadata["classes"] == ["blue", "green", "red"]
    assert metadata["preprocessing"]["input_size"] == [3, 64, 64]
    assert metadata["architecture"] == "test_efficientnet"
    model_config = json.loads((trained_run / "model" / "config.json").read_text())["transferkit"]
    assert metadata["calibration"] == model_config["calibration"] and metadata["unknown"] == model_config["unknown"]
    assert [output.name for output in proto.graph.output] == ["logits", "unknown_score"]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        outputs = session.run(None, {"input": np.zeros((batch, 3, 64, 64), np.float32)})[0]
        assert outputs.shape == (batch, 3), "the batch axis is dynamic"


def test_dynamic_int8_export_is_smaller_and_stays_close(trained_run: Path, tmp_path: Path) -> None:
    float_result = export(trained_run, output=tmp_path / "model.onnx")
    # The tiny run has 9 validation images: one of them is 11 points.
    int8 = export(trained_run, quantize="int8-dynamic", output=tmp_path / "model.int8.onnx", max_accuracy_drop=12)

    assert int8.size_bytes < 0.5 * float_result.size_bytes
    # Dynamic int8's tolerance here: probabilities within 0.25, and accuracy within one
    # validation image (the tiny run has 9, so one is 11 points).
    assert 0 < int8.max_abs_diff <= 0.25
    assert abs(int8.accuracy - int8.reference_accuracy) * int8.images <= 1 + 1e-9
    assert load_predictor(int8.path).classes == ["blue", "green", "red"]


def test_torchscript_export_matches_the_eager_model(trained_run: Path, tmp_path: Path) -> None:
    import torch

    result = export(trained_run, format="torchscript", output=tmp_path / "model.pt")

    assert result.max_abs_diff <= 1e-5 and result.accuracy == result.reference_accuracy
    extra = {"transferkit.json": ""}
    module = torch.jit.load(str(result.path), _extra_files=extra)
    assert json.loads(extra["transferkit.json"])["classes"] == ["blue", "green", "red"]
    logits, unknown_scores = module(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 3) and unknown_scores.shape == (2,)


def test_predict_and_evaluate_take_the_onnx_file_like_the_run(trained_run: Path, tmp_path: Path) -> None:
    onnx_file = export(trained_run, output=tmp_path / "model.onnx").path
    paths = val_paths(trained_run)

    from_run = predict(trained_run, paths, top_k=3)
    from_file = predict(onnx_file, paths, top_k=3)
    assert [p.labels for p in from_file.predictions] == [p.labels for p in from_run.predictions]
    np.testing.assert_allclose(
        [p.probabilities for p in from_file.predictions], [p.probabilities for p in from_run.predictions], atol=1e-5
    )

    data = trained_run.parent / "data"
    evaluation = evaluate(onnx_file, data)
    assert evaluation.output == tmp_path / "evaluation" / "data"
    assert evaluation.metrics["images"] == 60
    assert [Path(path).name for path, _ in evaluation.skipped] == ["truncated.jpg"]


def test_onnx_predict_runs_without_torch_or_timm(trained_run: Path, tmp_path: Path) -> None:
    onnx_file = export(trained_run, output=tmp_path / "model.onnx").path
    image = val_paths(trained_run)[0]
    completed = run_cli_without_torch(["predict", str(onnx_file), image, "--format", "json", "--top-k", "1"])

    assert completed.returncode == 0, completed.stderr
    answered = json.loads(completed.stdout)["predictions"][0]
    expected = predict(trained_run, [image], top_k=1).predictions[0]
    assert answered["top_k"][0]["label"] == expected.labels[0]
    assert answered["top_k"][0]["probability"] == pytest.approx(expected.probabilities[0], abs=1e-5)
    # The temperature and the unknown score are in the graph, the threshold in the metadata.
    assert answered["unknown_score"] == pytest.approx(expected.unknown_score, abs=1e-5)
    assert answered["answer"] == expected.answer


def test_export_problems_are_one_line_each(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(trained_run), "--format", "torchscript", "--quantize", "int8"]) == 2
    assert capsys.readouterr().err.strip() == "error: --quantize int8 works with --format onnx or openvino, not torchscript"

    assert main(["export", str(tmp_path)]) == 2
    assert "is not a finished run folder" in capsys.readouterr().err

    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("hello")
    assert main(["predict", str(not_onnx), str(not_onnx)]) == 2
    assert "is not a readable ONNX model" in capsys.readouterr().err

    onnx_file = export(trained_run, output=tmp_path / "exported.onnx").path
    assert main(["evaluate", str(onnx_file)]) == 2
    assert "give a labelled folder DATA" in capsys.readouterr().err


def test_export_command_prints_the_check(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "cli.onnx"
    assert main(["export", str(trained_run), "--output", str(target), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"exported {target}" in out
    assert "max |probability difference|" in out and "accuracy  exported" in out
    assert target.is_file()


def test_the_onnx_export_is_reused_until_the_weights_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("transferkit.inference.onnx_runtime.ONNX_CACHE_KEEP", 2)
    model = timm.create_model(TINY_MODEL, num_classes=2).eval()
    size = (3, 64, 64)
    batch = np.random.default_rng(0).standard_normal((2, *size)).astype(np.float32)

    def through_onnx() -> np.ndarray:
        return session_forward(cached_session(model, size))(batch)

    def eager() -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()

    def exports() -> list[Path]:
        return sorted(onnx_cache_folder().glob("*.onnx"))

    assert np.allclose(through_onnx(), eager(), atol=1e-5)
    kept = exports()
    assert len(kept) == 1
    assert np.allclose(through_onnx(), eager(), atol=1e-5) and exports() == kept, "the second session reads the export"

    for _ in range(2):  # retrained weights: never a stale export, and only the newest two are kept
        with torch.no_grad():
            model.get_classifier().bias += 1.0
        assert np.allclose(through_onnx(), eager(), atol=1e-5)
    assert len(exports()) == 2 and kept[0] not in exports()

    for path in exports():
        path.write_bytes(b"not a model any more")
    assert np.allclose(through_onnx(), eager(), atol=1e-5), "a damaged cache file is exported again"


def test_a_file_that_does_not_apply_the_models_temperature_is_refused(trained_run: Path, tmp_path: Path) -> None:
    import copy
    import dataclasses

    from transferkit.export import onnx as onnx_export
    from transferkit.export.parity import ExportCheckError, check_temperature, compare
    from transferkit.inference.loading import load_run_model, predictor_from_metadata, predictor_metadata
    from transferkit.inference.predictor import torch_forward

    _, model = load_run_model(trained_run)
    paths = val_paths(trained_run)

    def with_temperature(temperature: float) -> torch.nn.Module:
        module = copy.deepcopy(model.module).eval()
        module.temperature.fill_(temperature)
        return module

    # The model as calibrated at T=2 (the tiny run's own 9 images keep T=1, which no check can tell from none).
    eager = predictor_from_metadata(torch_forward(with_temperature(2.0), "cpu"), predictor_metadata(model), "eager")
    expected, _ = eager.scored(paths)
    for temperature, kept in [(2.0, True), (1.0, False), (6.0, False)]:
        path = tmp_path / f"t{temperature:g}.onnx"
        onnx_export.write(with_temperature(temperature), predictor_metadata(model), path, None, None)
        actual, _ = load_predictor(path).scored(paths)
        parity = compare(expected, None, actual, None, np.zeros(len(paths)), reference_temperature=2.0)
        # Accuracy cannot tell: dividing the logits by any temperature keeps every top class.
        assert parity.accuracy == parity.reference_accuracy
        assert parity.temperature == pytest.approx(temperature, rel=1e-3)
        if kept:
            check_temperature(parity, "the file")
            check_temperature(parity, "the file", quantized=True)
        else:
            with pytest.raises(ExportCheckError, match=f"temperature of {temperature:.3f}, not the model's 2.000"):
                check_temperature(parity, "the file")
        if temperature == 1.0:  # int8 rounding may move the scale, never back to none at all
            with pytest.raises(ExportCheckError):
                check_temperature(parity, "the file", quantized=True)
    # A model calibrated near 1 leaves int8's rounding no room to stay nearer it than to none: kept.
    check_temperature(dataclasses.replace(parity, temperature=1.01, reference_temperature=1.02), "int8", quantized=True)


def test_static_int8_stores_the_knn_training_features_in_int8_and_is_about_4x_smaller(tmp_path: Path) -> None:
    from transferkit.export import onnx as onnx_export
    from transferkit.trust.unknown import ScoredClassifier, normalized_bank

    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, num_classes=3).eval()
    # A knn bank as large against the weights as a real run's (2,934 x 1,280 against EfficientNet-Lite0's 3.4M).
    bank = normalized_bank(torch.rand(2000, model.num_features))
    module = ScoredClassifier(model, 1.5, "knn", bank, 10).eval()
    metadata = {"preprocessing": {"input_size": [3, 64, 64]}}
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((8, 3, 64, 64)).astype(np.float32) for _ in range(4)]
    onnx_export.write(module, metadata, tmp_path / "float.onnx", None, None)
    onnx_export.write(module, metadata, tmp_path / "int8.onnx", calibration, "int8")

    float_size, int8_size = ((tmp_path / name).stat().st_size for name in ("float.onnx", "int8.onnx"))
    assert int8_size < 0.35 * float_size, f"{int8_size} bytes against {float_size}"
    int8_types = [i.data_type for i in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer if i.dims == [model.num_features, 2000]]
    assert int8_types == [onnx.TensorProto.INT8]
    with torch.no_grad():
        _, eager_scores = module(torch.from_numpy(calibration[0]))
    _, int8_scores = session_forward(ort.InferenceSession(str(tmp_path / "int8.onnx")))(calibration[0])
    # int8 activations move the score by about 1e-2; the bank's rounding adds about 1e-3.
    assert np.abs(int8_scores - eager_scores.numpy()).max() < 0.05


def test_an_int8_file_that_moves_answers_says_so_in_one_warning_line(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transferkit.export.parity import AGREEMENT_WARNING, PROBABILITY_MOVE_WARNING

    def warnings() -> list[str]:
        found = [record.getMessage() for record in caplog.records if "moves a class probability" in record.getMessage()]
        caplog.clear()
        return found

    export(trained_run, output=tmp_path / "model.onnx")
    assert warnings() == [], "a float file agrees with its model"
    # The tiny run's 9 validation images: one unknown answer that changes is 11% of them.
    result = export(trained_run, quantize="int8", output=tmp_path / "model.int8.onnx", max_accuracy_drop=100)
    moved = result.max_abs_diff > PROBABILITY_MOVE_WARNING or result.unknown_agreement < AGREEMENT_WARNING
    assert moved, "the tiny int8 file changes at least one unknown answer"
    [line] = warnings()
    assert f"up to {result.max_abs_diff:.2f}" in line and f"agrees on {result.unknown_agreement:.1%}" in line
    assert "ship the float file" in line


@pytest.mark.parametrize("side", [64, 72, 80])
def test_an_export_gives_the_models_own_maps_where_same_padding_is_uneven(side: int) -> None:
    from transferkit.inference.onnx_runtime import create_session, export_onnx

    torch.manual_seed(0)
    # At 72 and 80 px some maps have odd sides, so 'same' padding differs left and right; the
    # simplified export once gave 2x2 maps there for the model's 3x3 (and moved pooled features in silence).
    model = timm.create_model(TINY_MODEL, num_classes=0, global_pool="", pad_type="same").eval()
    exported = io.BytesIO()
    export_onnx(model, (3, side, side), exported)
    images = np.random.default_rng(1).standard_normal((3, 3, side, side)).astype(np.float32)
    [maps] = create_session(exported.getvalue()).run(None, {"input": images})
    with torch.no_grad():
        np.testing.assert_allclose(maps, model(torch.from_numpy(images)).numpy(), rtol=1e-4, atol=1e-4)


def test_same_padding_is_fixed_for_the_input_size_so_the_file_stops_computing_it(tmp_path: Path) -> None:
    import collections
    import copy

    from transferkit.export import onnx as onnx_export
    from transferkit.models.padding import fix_same_padding

    torch.manual_seed(0)
    # The padding of timm's tf_ models (EfficientNet-Lite among them), which the file works out per call.
    model = timm.create_model(TINY_MODEL, num_classes=3, pad_type="same").eval()
    fixed = fix_same_padding(copy.deepcopy(model), (3, 64, 64))
    images = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(fixed(images), model(images))

    def optimised_ops(module: torch.nn.Module, name: str) -> collections.Counter[str]:
        path = tmp_path / f"{name}.onnx"
        onnx_export.write(module, {"preprocessing": {"input_size": [3, 64, 64]}}, path, [images.numpy()], "int8")
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.optimised.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)

    # Whether fixed before the export or folded after it, no file works its padding out per call, and each
    # Pad is inside its convolution, so int8 never pads in float between a dequantise and a quantise.
    for ops in (optimised_ops(model, "dynamic"), optimised_ops(fixed, "fixed")):
        assert ops["Shape"] == 0 and ops["Pad"] == 0, ops

    float_file = tmp_path / "fixed-float.onnx"
    onnx_export.write(fixed, {"preprocessing": {"input_size": [3, 64, 64]}}, float_file, None, None)
    assert not [node for node in onnx.load(str(float_file)).graph.node if node.op_type == "Pad"]
    session = ort.InferenceSession(str(float_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": images.numpy()})[0], model(images).numpy(), atol=1e-5)
