"""Run folders under accident and attack, with real processes, real signals and real failing writes:
two trains into one folder, Ctrl-C and SIGTERM, a full disk mid-checkpoint, damaged checkpoints,
and a checkpoint crafted to run code on ``--resume``."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from conftest import make_folder
from transferkit.cli.console import stop_on_sigterm
from transferkit.training.checkpoints import checkpoint_problem, save_checkpoint
from transferkit.errors import Interrupted, RunFolderError
from transferkit.run.records import PhaseRecord
from transferkit.run.folder import RunFolder, is_exported_file, model_folder
from transferkit import resume


def train_command(data: Path, run_dir: Path, weights: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "transferkit.cli", "train", str(data), "--output", str(run_dir),
        "--model", "test_efficientnet", "--weights", str(weights), "--image-size", "64", "--num-workers", "0",
        "--finetune-unfreeze", "all", "--no-progress", "--no-report", *extra,
    ]


def _as_from_a_terminal() -> None:
    # A suite started in the background of a script (``cmd &``) runs with SIGINT ignored, and a
    # child inherits that: Ctrl-C in a terminal is what these tests model, so it is restored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(command: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload]
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal, **kwargs
    )


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared: {process.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.rglob("*.tmp")]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", per_class=30)


# A features phase of a few seconds: the process is surely inside it when its first epoch's
# row appears, and a resume takes seconds.
LONG_FROZEN = ("--frozen-epochs", "300", "--frozen-patience", "300", "--finetune-epochs", "1", "--batch-size", "2")
# A run of minutes, for a test that ends it itself: the first run is still training whatever the test does.
LONG_RUN = ("--frozen-epochs", "300", "--frozen-patience", "300", "--finetune-epochs", "300", "--finetune-patience", "300")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_in_a_phase_exits_non_zero_says_how_to_resume_and_resume_finishes(
    data: Path, tmp_path: Path, tiny_weights: Path, signum: int, status: int
) -> None:
    run_dir = tmp_path / "run"
    process = start(train_command(data, run_dir, tiny_weights, *LONG_FROZEN))
    wait_for(run_dir / "history.csv", process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted; finish the run with: transferkit train --resume {run_dir}"
    assert not leftovers(run_dir)
    assert not (run_dir / "metrics.json").exists()
    assert checkpoint_problem(run_dir / "checkpoints" / "frozen-last.ckpt") is None, "the stop saved the epochs done"
    # The claim on the folder ended with the process: the promised command works.
    finished = subprocess.run(
        [sys.executable, "-m", "transferkit.cli", "train", "--resume", str(run_dir)],
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_sigterm_while_the_report_is_drawn_leaves_no_temporary_file(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    figures = run_dir / "figures"
    shutil.rmtree(figures, ignore_errors=True)
    process = start([sys.executable, "-m", "transferkit.cli", "report", str(run_dir)])
    deadline = time.monotonic() + 120
    while not (figures.is_dir() and any(figures.glob(".*.tmp"))):
        assert process.poll() is None, "the report finished before a figure was caught being written"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert not leftovers(run_dir)


def test_a_second_train_into_the_same_output_is_refused_while_the_first_runs(
    data: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    first = start(train_command(data, run_dir, tiny_weights, *LONG_RUN))
    try:
        wait_for(run_dir / "checkpoints" / "frozen-last.ckpt", first)
        config_before = (run_dir / "config.yaml").read_text()
        second = subprocess.run(
            train_command(data, run_dir, tiny_weights, "--seed", "7"), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1, second.stderr
        assert f"{run_dir} is being written by another transferkit process (pid {first.pid})" in second.stderr
        resumed = subprocess.run(
            [sys.executable, "-m", "transferkit.cli", "train", "--resume", str(run_dir)],
            capture_output=True, text=True, timeout=120,
        )
        assert resumed.returncode == 2 and "being written by another transferkit process" in resumed.stderr
        assert (run_dir / "config.yaml").read_text() == config_before, "the first run's config is untouched"
    finally:
        first.kill()
        first.wait()
    # Killed, the first run no longer holds the folder, and its work is there to resume, not to overwrite.
    again = subprocess.run(train_command(data, run_dir, tiny_weights), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds a run; resume it with --resume" in again.stderr


def test_a_start_killed_before_training_does_not_block_the_same_command(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=150)
    run_dir = tmp_path / "run"
    killed = start(train_command(data, run_dir, tiny_weights, "--frozen-epochs", "1", "--finetune-epochs", "0"))
    wait_for(run_dir / "config.yaml", killed)
    killed.kill()  # during the feature pass, before anything was trained
    killed.wait()
    assert not list((run_dir / "checkpoints").glob("*.ckpt")), "killed too late for this test"
    again = subprocess.run(
        train_command(data, run_dir, tiny_weights, "--frozen-epochs", "1", "--finetune-epochs", "0"),
        capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert (run_dir / "metrics.json").is_file()


def test_a_full_disk_while_checkpointing_leaves_only_whole_checkpoints_and_resume_finishes(
    data: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    command = train_command(data, run_dir, tiny_weights, "--frozen-epochs", "2", "--finetune-epochs", "2")
    head_only = 100_000  # features-phase checkpoints hold the head (about 30 KB); fine-tuning's hold the model

    def small_disk() -> None:
        # Writes past this size fail with EFBIG, as writes to a full disk fail with ENOSPC.
        resource.setrlimit(resource.RLIMIT_FSIZE, (head_only * 5, head_only * 5))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    process = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert process.returncode == 1, process.stderr
    assert "Traceback" not in process.stderr
    last_line = process.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: could not read or write {run_dir / 'checkpoints' / 'finetune-'}"), last_line
    assert "File too large" in last_line, last_line
    assert last_line.endswith(f"finish the run with: transferkit train --resume {run_dir}")
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["frozen-best.ckpt", "frozen-last.ckpt"]
    assert all(checkpoint_problem(p) is None for p in checkpoints), "no half-written checkpoint"
    assert not leftovers(run_dir)

    result = resume(run_dir)
    assert result.metrics["phases"]["finetune"]["epochs"] == 2
    assert (run_dir / "model" / "model.safetensors").is_file()


class _StopWhileSerialised:
    """Sends this process SIGTERM from inside ``torch.save``, where a real stop can land."""

    def __reduce__(self) -> tuple[type, tuple[int]]:
        os.kill(os.getpid(), signal.SIGTERM)
        return int, (0,)


def test_a_stop_while_a_checkpoint_is_serialised_writes_it_whole_then_stops(tmp_path: Path) -> None:
    # A stop raised inside torch.save would come out as its RuntimeError, which the head loop does
    # not take for a stop, so it would not keep its last epoch.
    previous = signal.getsignal(signal.SIGTERM)
    stop_on_sigterm()
    try:
        with pytest.raises(Interrupted):
            save_checkpoint({"weights": torch.ones(3), "stop": _StopWhileSerialised()}, tmp_path / "last.ckpt")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["weights"].tolist() == [1.0, 1.0, 1.0]
    assert not leftovers(tmp_path)


def test_a_failing_write_names_the_file_it_was_writing_not_its_temporary_file(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse a write past a size (EFBIG), unprivileged, as a full disk refuses one (ENOSPC)."""
    target = tmp_path / "run" / "metrics.json"
    script = (
        "import resource, signal, sys\n"
        "from transferkit._io import write_json\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "try:\n"
        "    write_json(sys.argv[1], ['x' * 100] * 100)\n"
        "except OSError as error:\n"
        "    print(error)\n"
    )
    written = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=60)
    assert written.stdout.strip() == f"[Errno 27] File too large: '{target}'", written.stderr
    assert not leftovers(tmp_path) and not target.exists()


def snapshot(path: Path) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(file): file.read_bytes() for file in files}


@pytest.mark.parametrize("entry, target", [
    ("model", "model"), ("checkpoints", "checkpoints"), (".transferkit.lock", "metrics.json"),
])
def test_a_link_out_of_the_run_folder_is_refused_before_any_work_and_its_target_kept(
    data: Path, tmp_path: Path, tiny_weights: Path, trained_run: Path, entry: str, target: str
) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    before = snapshot(other)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / entry).symlink_to(other / target)

    process = subprocess.run(
        train_command(data, run_dir, tiny_weights, "--frozen-epochs", "1", "--finetune-epochs", "0"),
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 2, process.stderr
    assert process.stderr.count("\n") == 1, process.stderr
    assert f"{run_dir / entry} is a link to {other / target}, outside the run folder {run_dir}" in process.stderr
    assert snapshot(other) == before, "the other run's files are as they were"
    assert not (run_dir / "config.yaml").exists(), "refused before any work"


def test_calibrate_refuses_a_run_whose_model_folder_is_a_link_to_another_run_s(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    from transferkit.commands.calibrate import calibrate

    other, run_dir = tmp_path / "other", tmp_path / "run"
    shutil.copytree(trained_run, other)
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("model"))
    (run_dir / "model").symlink_to(other / "model")
    before = snapshot(other)
    with pytest.raises(RunFolderError, match=f"{run_dir / 'model'} is a link to {other / 'model'}, outside the run"):
        calibrate(run_dir)
    assert snapshot(other) == before, "the other run's temperature and threshold are as they were"


@pytest.mark.parametrize("command", ["export", "evaluate"])
def test_export_and_evaluate_refuse_to_write_through_a_link_out_of_the_run(
    trained_run: Path, tmp_path: Path, command: str
) -> None:
    import shutil

    from transferkit.commands.evaluate import evaluate
    from transferkit.commands.export import export

    entry = "export" if command == "export" else "evaluation"
    other, run_dir = tmp_path / "other", tmp_path / "run"
    other.mkdir()
    (other / "notes.txt").write_text("theirs")
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns(entry))
    (run_dir / entry).symlink_to(other)
    before = snapshot(other)
    with pytest.raises(RunFolderError, match=f"{run_dir / entry} is a link to {other}, outside the run folder"):
        export(run_dir) if command == "export" else evaluate(run_dir, split="val")
    assert snapshot(other) == before, "nothing was written where the link leads"


def finished_run(data: Path, run_dir: Path, weights: Path) -> None:
    finished = subprocess.run(
        train_command(data, run_dir, weights, "--frozen-epochs", "3", "--finetune-epochs", "2"),
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr


def unfinish(run_dir: Path, phase: str) -> None:
    """The state a run killed inside ``phase`` leaves: the phase is not recorded as done, no metrics."""
    progress = json.loads((run_dir / "progress.json").read_text())
    del progress["phases"][phase]
    (run_dir / "progress.json").write_text(json.dumps(progress))
    (run_dir / "metrics.json").unlink()


def test_a_damaged_checkpoint_on_resume_falls_back_with_a_warning(
    data: Path, tmp_path: Path, tiny_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    finished_run(data, run_dir, tiny_weights)
    unfinish(run_dir, "finetune")
    last = run_dir / "checkpoints" / "finetune-last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # what a full disk left before the fix

    result = resume(run_dir)
    assert "finetune-last.ckpt is damaged" in caplog.text and "trying an earlier one" in caplog.text
    assert (run_dir / "checkpoints" / "finetune-last.ckpt.damaged").is_file()
    assert result.metrics["phases"]["finetune"]["done"]

    # A finished phase whose best checkpoint was damaged afterwards is trained again, not lost.
    caplog.clear()
    best = run_dir / "checkpoints" / "frozen-best.ckpt"
    best.write_bytes(b"not a checkpoint")
    unfinish(run_dir, "finetune")
    result = resume(run_dir)
    assert "its best checkpoint" in caplog.text and "training the phase again" in caplog.text
    assert result.metrics["phases"]["frozen"]["epochs"] == 3 and checkpoint_problem(best) is None


def test_checkpoints_of_another_run_are_set_aside_as_damaged_and_the_resume_finishes(
    data: Path, tmp_path: Path, tiny_weights: Path, trained_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    finished_run(data, run_dir, tiny_weights)
    # Stopped inside the features phase: nothing recorded as done yet.
    (run_dir / "progress.json").unlink()
    (run_dir / "metrics.json").unlink()
    for checkpoint in (run_dir / "checkpoints").glob("finetune-*.ckpt"):
        checkpoint.unlink()
    for checkpoint in (run_dir / "checkpoints").glob("frozen-*.ckpt"):
        checkpoint.write_bytes((trained_run / "checkpoints" / checkpoint.name).read_bytes())  # 3 classes, not 2

    result = resume(run_dir)
    set_aside = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and ".damaged" in r.getMessage()]
    assert len(set_aside) == 2 and all("written for another model or class list" in m for m in set_aside), set_aside
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("frozen-*.damaged")) == [
        "frozen-best.ckpt.damaged", "frozen-last.ckpt.damaged"
    ]
    assert result.classes == ["blue", "red"] and result.metrics["phases"]["frozen"]["epochs"] == 3
    assert result.metrics["phases"]["finetune"]["epochs"] == 2


class _RunsCode:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_resume_never_unpickles_code_whatever_the_environment_says(
    data: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    finished_run(data, run_dir, tiny_weights)
    # A crafted last checkpoint of an unfinished phase: the one resume continues from.
    marker = tmp_path / "code-ran"
    last = run_dir / "checkpoints" / "finetune-last.ckpt"
    crafted = torch.load(last, weights_only=True)
    crafted["payload"] = _RunsCode(marker)
    torch.save(crafted, last)
    unfinish(run_dir, "finetune")

    environment = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    resumed = subprocess.run(
        [sys.executable, "-m", "transferkit.cli", "train", "--resume", str(run_dir)],
        capture_output=True, text=True, timeout=300, env=environment,
    )
    assert not marker.exists(), "the checkpoint ran code"
    assert resumed.returncode == 0, resumed.stderr
    assert "finetune-last.ckpt is damaged (holds something other than tensors, refused: Unsupported global" in resumed.stderr


def test_every_record_written_back_gives_the_same_bytes(trained_run: Path, tmp_path: Path) -> None:
    """Run folders written before the typed records existed still load, and load to the same file."""
    folder, copy = RunFolder(trained_run), RunFolder(tmp_path / "copy")
    copy.write_config(*folder.read_record())
    copy.write_index(folder.read_index(tmp_path))
    for epoch in folder.read_history():
        copy.write_epoch(epoch)
    copy.write_progress(folder.read_progress())
    metrics = folder.read_metrics()
    assert metrics is not None
    copy.write_metrics(metrics)
    for name in ("config_file", "classes_file", "splits_file", "skipped_file", "duplicates_file", "history_file",
                 "progress_file", "metrics_file"):
        assert getattr(copy, name).read_bytes() == getattr(folder, name).read_bytes(), name

    best = metrics.phases[metrics.best_phase]
    assert isinstance(best, PhaseRecord) and best.done and best.val is not None
    assert best.best_val_loss == min(p.best_val_loss for p in metrics.usable_phases().values())
    assert metrics.judged == (metrics.test or metrics.val) and set(metrics.val) >= {"accuracy", "macro_f1"}
    assert [e.phase for e in folder.read_history()][0] == "frozen"
    assert (folder.root / best.best_checkpoint).is_file()


def test_a_run_folder_from_before_fine_tuning_on_activations_resumes_on_images(trained_run: Path, tmp_path: Path) -> None:
    """A run started when every run fine-tuned on images goes on on images, whatever today's default."""
    import shutil

    import yaml

    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    values = yaml.safe_load((old / "config.yaml").read_text())
    assert values.pop("finetune_on") == "auto"
    (old / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    assert RunFolder(old).read_config().finetune_on == "images"


def test_a_run_folder_says_what_it_holds(trained_run: Path, tmp_path: Path) -> None:
    folder = RunFolder(trained_run)
    assert folder.is_run() and folder.is_finished() and folder.has_model() and folder.holds_work()
    assert folder.has_evaluation("test") and not folder.has_evaluation("nowhere")
    assert RunFolder.containing(folder.model_dir).root == trained_run
    assert model_folder(trained_run) == folder.model_dir == model_folder(folder.model_dir)
    assert folder.checkpoint("frozen", "best") == trained_run / "checkpoints" / "frozen-best.ckpt"
    assert folder.export_file("onnx", "int8") == trained_run / "export" / "model.int8.onnx"

    empty = RunFolder(tmp_path)
    assert not (empty.is_run() or empty.is_finished() or empty.has_model() or empty.holds_work())
    assert empty.read_progress() == {} and empty.read_metrics() is None and empty.read_history() == []
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "model.tflite").write_bytes(b"")
    assert is_exported_file(tmp_path / "model.onnx") and is_exported_file(tmp_path / "model.tflite")
    assert not is_exported_file(tmp_path / "folder.onnx") and not is_exported_file(tmp_path / "splits.csv")
    with pytest.raises(RunFolderError, match="is not a run folder: .*config.yaml is missing"):
        empty.read_config()
    with pytest.raises(RunFolderError, match="has no splits.csv, classes.json, skipped.csv; --splits-from"):
        empty.read_index(tmp_path)
