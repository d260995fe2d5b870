"""A model folder or an export that says something its model cannot be used with (a NaN
temperature, a zero std, fewer class names than outputs) is refused in one line naming the file,
the field and the fix, by predict, evaluate, serve and export; it never answers wrong in silence."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from conftest import COLOURS, make_image, serving
from transferkit._io import read_csv_rows
from transferkit.cli import main
from transferkit.errors import ModelOutputError, RunFolderError
from transferkit.commands.predict import predict
from transferkit.commands.export import export
from transferkit.inference.predictor import Predictor
from transferkit.inference.loading import load_predictor
from transferkit.inference.onnx_runtime import create_session, session_forward
from transferkit.commands.serve_app import create_app

NAN = float("nan")
Edit = Callable[[dict[str, Any]], None]


def val_images(run_dir: Path) -> list[str]:
    return [row["path"] for row in read_csv_rows(run_dir / "splits.csv") if row["split"] == "val"]


def copied_run(trained_run: Path, tmp_path: Path, edit: Edit | None = None) -> Path:
    """A copy of the trained run whose model/config.json ``transferkit`` section ``edit`` changed."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "evaluation", "report*"))
    if edit is not None:
        config_file = run / "model" / "config.json"
        config = json.loads(config_file.read_text())
        edit(config["transferkit"])
        config_file.write_text(json.dumps(config))
    return run


def refusal(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``transferkit ARGUMENTS`` prints as it refuses, with exit status 2 and no answer."""
    code = main(arguments)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", out
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def set_in(record: str, **values: Any) -> Edit:
    return lambda extra: extra[record].update(values)


def without(record: str, key: str) -> Edit:
    return lambda extra: extra[record].pop(key)


BAD_TRUST = {
    "temperature NaN": (set_in("calibration", temperature=NAN), "calibration.temperature"),
    "temperature 0": (set_in("calibration", temperature=0), "calibration.temperature"),
    "temperature 1e-308": (set_in("calibration", temperature=1e-308), "calibration.temperature"),
    "temperature -1": (set_in("calibration", temperature=-1), "calibration.temperature"),
    "temperature 1e308": (set_in("calibration", temperature=1e308), "calibration.temperature"),
    "temperature abc": (set_in("calibration", temperature="abc"), "calibration.temperature"),
    "temperature null": (set_in("calibration", temperature=None), "calibration.temperature"),
    "no fitted_on": (without("calibration", "fitted_on"), "calibration.fitted_on"),
    "threshold NaN": (set_in("unknown", threshold=NAN), "unknown.threshold"),
    "threshold null": (set_in("unknown", threshold=None), "unknown.threshold"),
    "threshold abc": (set_in("unknown", threshold="abc"), "unknown.threshold"),
    "unknown method": (set_in("unknown", method="cosine"), "unknown.method"),
    "neighbours -3": (set_in("unknown", neighbours=-3), "unknown.neighbours"),
}


@pytest.mark.parametrize("edit, field", BAD_TRUST.values(), ids=BAD_TRUST.keys())
def test_a_bad_temperature_or_threshold_is_refused_in_one_line(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Edit, field: str
) -> None:
    run = copied_run(trained_run, tmp_path, edit)

    err = refusal(["predict", str(run), val_images(trained_run)[0]], capsys)

    assert err.startswith(f"error: {run / 'model' / 'config.json'}: transferkit.{field} is ")
    assert err.rstrip().endswith("refit it with `transferkit calibrate RUN`")
    assert refusal(["evaluate", str(run)], capsys) == err
    assert refusal(["export", str(run), "--output", str(tmp_path / "model.onnx")], capsys) == err
    assert not (tmp_path / "model.onnx").exists()
    with pytest.raises(RunFolderError) as raised:
        create_app(run)
    assert f"error: {raised.value}\n" == err


def test_serve_refuses_to_start_on_a_bad_model_folder_in_one_line(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copied_run(trained_run, tmp_path, set_in("calibration", temperature="abc"))

    err = refusal(["serve", str(run), "--port", "1"], capsys)

    config_file = run / "model" / "config.json"
    assert err.startswith(f"error: {config_file}: transferkit.calibration.temperature is 'abc'; ")


BAD_BANKS = {
    "float16": lambda bank: bank.half(),
    "int32": lambda bank: bank.int(),
    "3-D": lambda bank: bank[None],
    "empty": lambda bank: bank[:0],
    "one column short": lambda bank: torch.nn.functional.normalize(bank[:, 1:], dim=1),
    "NaN": lambda bank: torch.full_like(bank, NAN),
    "not normalised": lambda bank: bank * 5,
}


@pytest.mark.parametrize("change", BAD_BANKS.values(), ids=BAD_BANKS.keys())
def test_a_bad_knn_bank_is_refused_in_one_line(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    change: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    run = copied_run(trained_run, tmp_path)
    bank_file = run / "model" / "unknown_bank.safetensors"
    save_file({"bank": change(load_file(str(bank_file))["bank"]).contiguous()}, str(bank_file))

    err = refusal(["predict", str(run), val_images(trained_run)[0]], capsys)

    assert err.startswith(f"error: {bank_file}: bank ")
    assert err.rstrip().endswith("refit it with `transferkit calibrate RUN`")


def test_calibrate_repairs_what_it_names_and_the_model_answers_as_before(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copied_run(trained_run, tmp_path, set_in("calibration", temperature=NAN))
    images = val_images(trained_run)
    assert "calibration.temperature is nan" in refusal(["predict", str(run), *images], capsys)

    assert main(["calibrate", str(run)]) == 0
    assert main(["predict", str(run), *images]) == 0

    # Refitted on the same validation images, the temperature is the one train fitted.
    repaired, original = predict(run, images, reject=False), predict(trained_run, images, reject=False)
    assert [p.labels for p in repaired.predictions] == [p.labels for p in original.predictions]
    np.testing.assert_allclose([p.probabilities for p in repaired.predictions],
                               [p.probabilities for p in original.predictions], atol=1e-5)


BAD_PREPROCESSING = {
    "std 0": ({"std": [0, 0, 0]}, "preprocessing.std is [0, 0, 0]"),
    "crop_pct 0": ({"crop_pct": 0}, "preprocessing.crop_pct is 0"),
    "mean abc": ({"mean": "abc"}, "preprocessing.mean is 'abc'"),
    "input size 60000": ({"input_size": [3, 60000, 60000]}, "preprocessing.input_size is [3, 60000, 60000]"),
}


@pytest.mark.parametrize("values, problem", BAD_PREPROCESSING.values(), ids=BAD_PREPROCESSING.keys())
def test_bad_preprocessing_in_a_model_folder_is_refused_in_one_line(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], values: dict[str, Any], problem: str
) -> None:
    run = copied_run(trained_run, tmp_path, lambda extra: extra["preprocessing"].update(values))

    err = refusal(["predict", str(run), val_images(trained_run)[0]], capsys)

    assert err.startswith(f"error: {run / 'model' / 'config.json'}: transferkit.{problem}")
    assert err.rstrip().endswith("fix it there or train the model again")


# --- exports ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(trained_run, output=tmp_path_factory.mktemp("export") / "model.onnx").path


def rewritten(onnx_file: Path, target: Path, edit: Edit) -> Path:
    """A copy of ``onnx_file`` whose transferkit metadata ``edit`` changed, the graph untouched."""
    proto = onnx.load(str(onnx_file))
    props = {p.key: p.value for p in proto.metadata_props}
    metadata = json.loads(props["transferkit"])
    edit(metadata)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {**props, "transferkit": json.dumps(metadata)})
    onnx.save(proto, str(target))
    return target


def set_preprocessing(**values: Any) -> Edit:
    return lambda metadata: metadata["preprocessing"].update(values)


def set_classes(*names: str) -> Edit:
    return lambda metadata: metadata.update(classes=list(names))


BAD_METADATA = {
    "1 class for 3 outputs": (set_classes("blue"), "classes lists 1 class name for a model of 3 outputs"),
    "4 classes for 3 outputs": (set_classes("blue", "green", "red", "white"), "classes lists 4 class names"),
    "duplicate class names": (set_classes("blue", "blue", "red"), "classes names 'blue' more than once"),
    "threshold abc": (lambda m: m["unknown"].update(threshold="abc"), "unknown.threshold is 'abc'"),
    "threshold NaN": (lambda m: m["unknown"].update(threshold=NAN), "unknown.threshold is nan"),
    "temperature -1": (lambda m: m["calibration"].update(temperature=-1), "calibration.temperature is -1"),
    "crop_pct 0": (set_preprocessing(crop_pct=0), "preprocessing.crop_pct is 0"),
    "std 0": (set_preprocessing(std=[0, 0, 0]), "preprocessing.std is [0, 0, 0]"),
    "mean NaN": (set_preprocessing(mean=[NAN, 0.5, 0.5]), "preprocessing.mean is [nan, 0.5, 0.5]"),
    "interpolation unknown": (set_preprocessing(interpolation="cubic"), "interpolation is 'cubic'"),
    "input size 60000": (set_preprocessing(input_size=[3, 60000, 60000]), "input_size is [3, 60000, 60000]"),
    "input size not the graph's": (set_preprocessing(input_size=[3, 32, 32]),
                                   "input_size is [3, 32, 32]; it must be the model's input size, [3, 64, 64]"),
}


@pytest.mark.parametrize("edit, problem", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_bad_export_metadata_is_refused_in_one_line(
    exported: Path, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Edit, problem: str
) -> None:
    onnx_file = rewritten(exported, tmp_path / "model.onnx", edit)

    err = refusal(["predict", str(onnx_file), *val_images(trained_run)[:2]], capsys)

    assert err.startswith(f"error: {onnx_file}: ") and problem in err
    assert err.rstrip().endswith("export it again with `transferkit export RUN`")
    assert refusal(["evaluate", str(onnx_file), str(trained_run.parent / "data")], capsys) == err
    with pytest.raises(RunFolderError) as raised:
        create_app(onnx_file)
    assert f"error: {raised.value}\n" == err


def test_a_predictor_whose_outputs_are_not_its_class_names_fails_each_request_clearly(
    exported: Path, trained_run: Path, tmp_path: Path
) -> None:
    # A Predictor made in code from a real session, where nothing checked the names against the graph.
    session = create_session(exported)
    predictor = Predictor(session_forward(session), ["blue", "green"], load_predictor(exported).preprocessing,
                          {"source": "two names"})
    expected = "two names gave outputs of shape (2, 3) for 2 class names; " \
               "export it again with `transferkit export RUN`"

    with pytest.raises(ModelOutputError) as raised:
        predictor.scored(val_images(trained_run)[:2])
    assert str(raised.value) == expected
    image = make_image(tmp_path / "red.png", COLOURS["red"], seed=3).read_bytes()
    with serving(create_app(predictor)) as url:
        files = [("file", ("a.png", image)), ("file", ("b.png", image))]
        answer = requests.post(f"{url}/predict", files=files, timeout=30)
        assert answer.status_code == 500 and answer.json() == {"detail": expected}


# --- weights that answer NaN --------------------------------------------------------------------


NAN_ANSWER = ("{} gave NaN or infinite probabilities or unknown scores, which no answer can be made of (its "
              "weights hold NaN or infinity); train or export the model again")


@pytest.fixture
def nan_weights_run(trained_run: Path, tmp_path: Path) -> Path:
    """A run whose classifier weights are NaN: every value config.json holds is fine."""
    run = copied_run(trained_run, tmp_path)
    weights_file = run / "model" / "model.safetensors"
    weights = load_file(str(weights_file))
    weights["classifier.weight"] = torch.full_like(weights["classifier.weight"], NAN)
    save_file(weights, str(weights_file))
    return run


def test_nan_probabilities_are_an_error_not_an_answer(
    nan_weights_run: Path, trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refusal(["predict", str(nan_weights_run), val_images(trained_run)[0]], capsys)

    assert err == f"error: {NAN_ANSWER.format(nan_weights_run / 'model')}\n"


def test_the_server_answers_nan_probabilities_with_an_error(nan_weights_run: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "red.png", COLOURS["red"], seed=3).read_bytes()
    with serving(create_app(nan_weights_run)) as url:
        answer = requests.post(f"{url}/predict", files=[("file", ("red.png", image))], timeout=30)
        assert answer.status_code == 500
        assert answer.json() == {"detail": NAN_ANSWER.format(nan_weights_run / "model")}
        assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
