"""examples/quickstart.ipynb run on a real Jupyter kernel, as a new user runs it, on a tiny model
and a folder of generated images given through its parameters."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL, make_folder

nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient, nbformat, ipykernel)")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def outputs_of(notebook: object, tag: str) -> tuple[str, str]:
    """(what the cell tagged ``tag`` printed, its rich result as HTML, else as text)."""
    cell = next(cell for cell in notebook.cells if tag in cell.metadata.get("tags", []))  # type: ignore[attr-defined]
    printed = "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")
    shown = [output.data.get("text/html") or output.data.get("text/plain", "")
             for output in cell.outputs if output.output_type == "execute_result"]
    return printed, "".join(shown)


def test_the_quickstart_notebook_runs_on_a_real_kernel_and_shows_each_result(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_folder(tmp_path / "photos", per_class=12, classes=("blue", "green", "red"))
    # The kernel is a child process: it reads its parameters from the environment it inherits.
    monkeypatch.setenv("QUICKSTART_DATA", str(data))
    monkeypatch.setenv("QUICKSTART_MODEL", TINY_MODEL)
    monkeypatch.setenv("QUICKSTART_EPOCHS", "2")
    monkeypatch.setenv("QUICKSTART_OPTIONS", json.dumps({
        "model.weights": str(tiny_weights), "data.image_size": 64, "data.num_workers": 0,
        "finetune.unfreeze": "2", "frozen.lr": 0.01, "audit": False,
    }))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), "the notebook is committed without outputs"

    started = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - started

    run_dir = next((tmp_path / "runs").iterdir())
    printed, shown = outputs_of(notebook, "train")
    assert "frozen" in printed and "val loss" in printed, "the epoch lines"
    assert f"report: {run_dir / 'report.html'}" in printed and (run_dir / "report.html").is_file()
    assert "<b>Training run</b>" in shown and "val accuracy" in shown and "data:image/png;base64," in shown
    every_stream = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
                           if output.output_type == "stream")
    assert "GPU available" not in every_stream and "LOCAL_RANK" not in every_stream, "nothing of Lightning's"

    _, shown = outputs_of(notebook, "history")
    last = (run_dir / "history.csv").read_text().strip().splitlines()[-1].split(",")
    assert "<th>val_loss</th>" in shown and f"<td>{last[0]}</td>" in shown, "history.csv's last epochs"
    _, shown = outputs_of(notebook, "evaluate")
    assert "<b>Evaluation on " in shown and "Confusion matrix" in shown
    printed, shown = outputs_of(notebook, "predict")
    assert " -> " in printed and "<b>Predictions for 1 images</b>" in shown
    answer = printed.strip().rsplit(" -> ", 1)[1]
    assert answer in ("blue", "green", "red", "unknown")
    printed, shown = outputs_of(notebook, "export")
    assert "model.onnx" in printed and "largest probability difference" in printed
    assert f"<td>{answer}</td>" in shown, "the exported file answers as the model did"
    print(f"notebook executed in {seconds:.1f} s")
