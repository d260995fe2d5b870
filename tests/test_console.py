"""A train from Python as a notebook user meets it: keywords, a short result, progress on the
console and nothing of Lightning's; and a piped command-line train as a log reads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import transferkit
from transferkit.run.folder import RunFolder
from conftest import TINY_MODEL, make_folder, tiny_config

QUICK = {"data.image_size": 64, "data.batch_size": 16, "data.num_workers": 0, "frozen.lr": 0.01,
         "finetune.unfreeze": "2", "progress": False, "report": False, "audit": False}


def test_train_takes_keywords_and_returns_a_short_result(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    result = transferkit.train(data, epochs=2, model=TINY_MODEL, output=tmp_path / "run", seed=7,
                               options={**QUICK, "model.weights": str(tiny_weights)}, progress=False)
    saved = RunFolder(tmp_path / "run").read_config()
    assert saved.frozen.epochs == saved.finetune.epochs == 2, "epochs sets both phases, as --epochs"
    assert saved.seed == 7 and saved.model.name == TINY_MODEL
    text = repr(result)
    assert len(text) < 200 and str(tmp_path / "run") in text and "val accuracy" in text, text
    history = result.to_pandas()
    assert list(history["phase"]) == ["frozen"] * 2 + ["finetune"] * len(history[history["phase"] == "finetune"])
    assert "val accuracy" in result._repr_html_()


def test_keywords_change_a_given_config_and_keep_the_rest(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    config = tiny_config(tmp_path / "unused", tiny_weights, **{"label_smoothing": 0.2})
    transferkit.train(data, config, epochs=1, output=tmp_path / "run", progress=False)
    saved = RunFolder(tmp_path / "run").read_config()
    assert saved.frozen.epochs == saved.finetune.epochs == 1
    assert saved.label_smoothing == 0.2 and saved.data.image_size == 64
    assert config.frozen.epochs == 4, "the caller's config stays as it was"


def test_a_train_from_python_shows_epochs_and_a_summary_and_nothing_of_lightning(
    tmp_path: Path, tiny_weights: Path
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    options = {**QUICK, "model.weights": str(tiny_weights), "finetune_on": "images"}
    # A fresh interpreter, as a script or a notebook starts: no logging set up, Lightning imported by the train.
    script = (f"import transferkit\n"
              f"transferkit.train({str(data)!r}, epochs=2, model={TINY_MODEL!r}, output={str(tmp_path / 'run')!r}, "
              f"options={options!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0].startswith("estimated time: about "), done.stdout  # said before any work
    assert [line.split()[:2] for line in out[1:5]] == [["frozen", "1/2"], ["frozen", "2/2"],
                                                       ["finetune", "1/2"], ["finetune", "2/2"]], done.stdout
    assert any(line.startswith("validation accuracy of the saved model:") for line in out)
    for noise in ("GPU available", "TPU available", "Tip", "Checkpoint directory", "deprecated", "eval mode",
                  "Trainer.fit", "Automatic Mixed Precision"):
        assert noise not in done.stderr + done.stdout, done.stderr
    assert all(line.startswith("warning: ") for line in done.stderr.splitlines()), done.stderr
