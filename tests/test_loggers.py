"""--logger: Lightning's CSV, TensorBoard and MLflow loggers get the config, every epoch of both
phases, the final metrics and the artifacts; read back with TensorBoard's own reader and MLflow's
own client, from tiny real runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL, make_folder, tiny_config
from transferkit import resume, train
from transferkit.config import TrainConfig
from transferkit.errors import ConfigError

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed (pip install 'transferkit[tensorboard]')")
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow is not installed (pip install 'transferkit[mlflow]')")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb is not installed (pip install wandb)")


def history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(epoch, val_loss) of every history.csv row, per phase."""
    rows: dict[str, list[tuple[int, float]]] = {}
    with (run_dir / "history.csv").open() as file:
        for row in csv.DictReader(file):
            rows.setdefault(row["phase"], []).append((int(row["epoch"]), float(row["val_loss"])))
    return rows


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    """Every scalar's (step, value) and the reader itself, as TensorBoard reads the folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    reader.Reload()
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)]
            for tag in reader.Tags()["scalars"]}, reader


def mlflow_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("transferkit")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    """One tiny run with its report, logged to csv, tensorboard and mlflow at once."""
    if importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("mlflow") is None:
        pytest.skip("needs tensorboard and mlflow (pip install 'transferkit[tensorboard,mlflow]')")
    root = tmp_path_factory.mktemp("logged")
    data = make_folder(root / "data", per_class=20, classes=("blue", "green", "red"))
    train(data, tiny_config(root / "run", tiny_weights, report=True, logger="csv,tensorboard,mlflow",
                            **{"finetune.epochs": 2}))
    return root / "run"


@needs_tensorboard
def test_tensorboard_holds_both_phases_epochs_the_config_and_the_final_metrics(logged_run: Path) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    scalars, reader = tensorboard_scalars(logged_run / "logs" / "tensorboard")
    rows = history(logged_run)
    assert set(rows) == {"frozen", "finetune"}
    for phase, epochs in rows.items():
        assert [step for step, _ in scalars[f"{phase}/val_loss"]] == [epoch for epoch, _ in epochs], phase
        assert [value for _, value in scalars[f"{phase}/val_loss"]] == pytest.approx([loss for _, loss in epochs],
                                                                                      abs=1e-5)
    metrics = json.loads((logged_run / "metrics.json").read_text())
    assert scalars["val/accuracy"][-1][1] == pytest.approx(metrics["val"]["accuracy"])
    assert scalars["test/log_loss"][-1][1] == pytest.approx(metrics["test"]["log_loss"])

    sessions = [plugin_data_pb2.HParamsPluginData.FromString(raw) for raw in reader.PluginTagToContent("hparams").values()]
    hparams = next(data.session_start_info.hparams for data in sessions if data.HasField("session_start_info"))
    assert hparams["frozen/lr"].number_value == pytest.approx(0.01)
    assert hparams["model/name"].string_value == TINY_MODEL
    assert hparams["data/source"].string_value.endswith("data")
    assert {"figures/confusion_matrix", "figures/training_curves"} <= set(reader.Tags()["images"])


@needs_mlflow
def test_mlflow_run_in_the_run_folder_holds_the_same_and_the_model_as_artifacts(logged_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{logged_run / 'logs' / 'mlflow.db'}"
    (run,) = mlflow_runs(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == logged_run.name
    assert run.info.run_id == json.loads((logged_run / "logs" / "run-ids.json").read_text())["mlflow"]
    assert run.data.params["frozen/lr"] == "0.01" and run.data.params["model/name"] == TINY_MODEL
    for phase, epochs in history(logged_run).items():
        logged = metric_history(uri, run.info.run_id, f"{phase}/val_loss")
        assert [step for step, _ in logged] == [epoch for epoch, _ in epochs], phase
        assert [value for _, value in logged] == pytest.approx([loss for _, loss in epochs], abs=1e-5)
    metrics = json.loads((logged_run / "metrics.json").read_text())
    assert run.data.metrics["val/accuracy"] == pytest.approx(metrics["val"]["accuracy"])
    assert run.data.metrics["test/macro_f1"] == pytest.approx(metrics["test"]["macro_f1"])

    client = MlflowClient(uri)
    top = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"model", "figures", "metrics.json", "config.yaml", "report.html"} <= top
    model = {Path(artifact.path).name for artifact in client.list_artifacts(run.info.run_id, "model")}
    assert {"model.safetensors", "config.json"} <= model
    # The artifacts live beside the store, not in a ./mlruns of wherever train was started.
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json"))
    assert json.loads(local.read_text()) == metrics
    assert (logged_run / "logs" / "mlflow-artifacts").is_dir() and not Path("mlruns").exists()


def wandb_records(path: Path) -> list:
    """The records of W&B's own run file (``run-ID.wandb``), decoded with W&B's own protobuf
    schema: its framing is LevelDB's log (32 KiB blocks of crc, length, type and data) after a
    7-byte header, and W&B ships no reader of its own for an offline run."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data, block, records, pending = path.read_bytes(), 1 << 15, [], b""
    assert data.startswith(b":W&B")
    position = 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(Record.FromString(pending))
            pending = b""
    return records


@needs_wandb
def test_wandb_offline_run_holds_the_config_both_phases_epochs_and_the_final_metrics(
    tmp_path: Path, tiny_weights: Path
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "transferkit.cli", "train", str(data), "--output", str(run_dir),
               "--model", TINY_MODEL, "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0",
               "--frozen-epochs", "3", "--finetune-epochs", "2", "--no-audit", "--no-report", "--logger", "wandb"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert process.returncode == 0, process.stderr[-2000:]  # --no-report: no report.html to upload

    (run_file,) = (run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    assert json.loads((run_dir / "logs" / "run-ids.json").read_text())["wandb"] in run_file.name
    records = wandb_records(run_file)
    config_keys = {u.key or u.nested_key[0] for r in records if r.WhichOneof("record_type") == "config"
                   for u in r.config.update}
    assert {"data", "model", "frozen", "finetune", "seed"} <= config_keys
    logged: dict[str, dict[int, float]] = {}
    for record in records:
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        if "trainer/global_step" in items:  # Lightning's steps, not W&B's own bookkeeping rows
            for key, value in items.items():
                logged.setdefault(key, {})[items["trainer/global_step"]] = value
    for phase, epochs in history(run_dir).items():
        assert logged[f"{phase}/val_loss"] == pytest.approx(dict(epochs)), phase
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert logged["val/accuracy"] == {0: pytest.approx(metrics["val"]["accuracy"])}
    artifacts = [r for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifacts and "model/model.safetensors" in {f.path for a in artifacts for f in a.artifact.manifest.contents}


def test_csv_logger_writes_lightnings_metrics_file_with_both_phases(logged_run: Path) -> None:
    with (logged_run / "logs" / "csv" / "version_0" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    for phase, epochs in history(logged_run).items():
        logged = [(int(row["step"]), float(row[f"{phase}/val_loss"])) for row in rows if row[f"{phase}/val_loss"]]
        assert logged == pytest.approx(epochs, abs=1e-5)
    assert "lr: 0.01" in (logged_run / "logs" / "csv" / "version_0" / "hparams.yaml").read_text()


def test_no_logger_is_the_default_and_leaves_no_logs_folder(trained_run: Path) -> None:
    assert TrainConfig().logger == "none"
    assert not (trained_run / "logs").exists()


def test_logger_names_and_mlflow_uri_are_checked_with_the_config() -> None:
    with pytest.raises(ConfigError, match="'tensorbord' is not one of none, csv, tensorboard.*tensorboard"):
        TrainConfig.from_options({"logger": "tensorbord"})
    with pytest.raises(ConfigError, match="--mlflow-uri .* is for --logger mlflow"):
        TrainConfig.from_options({"logger": "tensorboard", "mlflow_uri": "sqlite:///x.db"})
    assert TrainConfig.from_options({"logger": "TensorBoard, mlflow"}).logger == "TensorBoard, mlflow"


def test_a_missing_logger_package_is_one_line_naming_its_pip_install(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=4)
    # A process where importing mlflow fails, as on a machine without it.
    script = ("import sys; sys.modules['mlflow'] = None\nfrom transferkit.cli import main\n"
              f"sys.exit(main(['train', {str(data)!r}, '--output', {str(tmp_path / 'run')!r}, '--logger', 'csv,mlflow',"
              f" '--model', {TINY_MODEL!r}, '--weights', {str(tiny_weights)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --logger mlflow needs the mlflow package; install it with: pip install 'transferkit[mlflow]'"
    ]
    assert not (tmp_path / "run").exists(), "refused before any work"


@needs_tensorboard
@needs_mlflow
def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_folder_with_each_epoch_once(
    tmp_path: Path, tiny_weights: Path
) -> None:
    data = make_folder(tmp_path / "data", per_class=20)
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    (tmp_path / "elsewhere").mkdir()
    command = [sys.executable, "-m", "transferkit.cli", "train", str(data), "--output", str(run_dir),
               "--model", TINY_MODEL, "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0",
               "--frozen-epochs", "60", "--frozen-patience", "60", "--finetune-epochs", "1", "--no-report",
               "--no-audit", "--logger", "tensorboard,mlflow", "--mlflow-uri", uri,
               # config.yaml then holds the rate found, not the "auto" the MLflow run started with
               "--frozen-lr", "auto"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline and len(history(run_dir).get("frozen", [])
                                                                     if (run_dir / "history.csv").exists() else []) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode in (-signal.SIGINT, 128 + signal.SIGINT), "the run finished before it could be stopped"
    assert "mlflow" not in output.lower() and "tip:" not in output.lower(), output
    (stopped,) = mlflow_runs(uri)
    assert stopped.info.status == "KILLED"
    epochs_before = len(history(run_dir)["frozen"])
    assert 3 <= epochs_before < 60

    resume(run_dir, progress=False)
    (run,) = mlflow_runs(uri)
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    assert not (run_dir / "logs" / "mlflow.db").exists(), "--mlflow-uri is where the run went"
    assert list((tmp_path / "elsewhere" / "mlflow-artifacts").rglob("model.safetensors")), "artifacts beside its store"
    scalars, _ = tensorboard_scalars(run_dir / "logs" / "tensorboard")
    for phase, epochs in history(run_dir).items():
        expected = [epoch for epoch, _ in epochs]
        assert expected == list(range(1, len(expected) + 1))
        assert [step for step, _ in metric_history(uri, run.info.run_id, f"{phase}/val_loss")] == expected, phase
        assert [step for step, _ in scalars[f"{phase}/val_loss"]] == expected, phase
    assert len(history(run_dir)["frozen"]) > epochs_before
