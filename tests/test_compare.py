from __future__ import annotations

import csv
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATASETS, TINY_MODEL, make_folder
from transferkit.cli import main
from transferkit.commands.compare import compare
from transferkit.commands.strategies import STRATEGIES, STRATEGY_FUNCTIONS, StrategySettings
from transferkit.config import TrainConfig
from transferkit.errors import ConfigError
from transferkit.run.comparison import Comparison


def tiny_run_options(weights: Path) -> dict[str, object]:
    return {
        "data.image_size": 64, "data.batch_size": 16, "data.num_workers": 0, "model.weights": str(weights),
        "frozen.lr": 0.01, "progress": False,
    }


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def fixture_options(output: Path, weights: Path) -> dict[str, object]:
    # Its own feature cache: other fixtures' runs on the same images must not count as this one's.
    return {**tiny_run_options(weights), "cache_dir": str(output.parent / "cache")}


def test_each_strategy_is_a_function_from_the_shared_config_to_its_runs() -> None:
    shared = TrainConfig.from_options({"data.image_size": 64, "seed": 3})
    untouched = TrainConfig.from_options({"data.image_size": 64, "seed": 3})
    settings = StrategySettings(epochs=4, patience=2, hidden_size=32, unfreeze="2")
    configs = {name: STRATEGY_FUNCTIONS[name](shared, settings) for name in STRATEGIES}
    assert shared == untouched, "the shared config is not changed"
    assert all(c.data == shared.data and c.seed == 3 for c in configs.values()), "what the user set holds"
    phases = {name: (c.frozen.epochs, c.finetune.epochs, c.finetune.unfreeze) for name, c in configs.items()}
    assert phases == {
        "scratch": (0, 4, "all"), "frozen": (4, 0, "auto"), "frozen-dense": (4, 0, "auto"), "fine-tune": (4, 4, "2"),
        "full": (0, 4, "all"),
    }
    assert configs["scratch"].model.weights == "none" and configs["scratch"].batchnorm == "train"
    assert [name for name, c in configs.items() if c.model.hidden_size == 32] == ["frozen-dense"]
    assert all(c.frozen.patience == 2 for c in configs.values() if c.frozen.epochs)
    assert all(c.finetune.patience == 2 for c in configs.values() if c.finetune.epochs)


def test_views_go_to_the_strategy_that_fine_tunes_on_activations_alone() -> None:
    shared = TrainConfig.from_options({"finetune_on": "auto", "finetune_views": 2})
    settings = StrategySettings(epochs=4, patience=2, hidden_size=32, unfreeze="2")
    views = {name: STRATEGY_FUNCTIONS[name](shared, settings).finetune_views for name in STRATEGIES}
    assert views == {"scratch": 0, "frozen": 2, "frozen-dense": 2, "fine-tune": 2, "full": 0}


def test_bad_train_options_are_refused_with_the_comparisons_own_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        compare(str(tmp_path), strategies=["frozen"], epochs=0, output=tmp_path / "out", unfreeze="many",
                options={"data.batch_size": 0, "frozen.epoch": 3})
    assert raised.value.problems[0] == "--epochs must be at least 1, got 0"
    assert raised.value.problems[1] == "--unfreeze must be a block count (3), a fraction (0.3), 'all' or 'auto', got 'many'"
    assert raised.value.problems[2].startswith("'frozen.epoch' is not a TrainConfig option. Did you mean: frozen.epochs")
    assert raised.value.problems[3] == "--batch-size must be at least 1, got 0"
    assert not (tmp_path / "out").exists()


def test_activations_for_a_model_that_cannot_cache_them_is_refused_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        compare(str(tmp_path), models=["test_efficientnet", "test_vit"], output=tmp_path / "out",
                options={"finetune_on": "activations"})
    assert raised.value.problems == [
        "--finetune-on activations: test_vit cannot train its top 3 or 6 blocks on cached activations (fine-tune "
        "strategy); use --finetune-on auto, which falls back to images"
    ]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Comparison:
    root = tmp_path_factory.mktemp("compare")
    data = make_folder(root / "data", per_class=20, classes=("blue", "green", "red"))
    output = root / "comparison"
    lines = EpochLines()
    epochs = logging.getLogger("transferkit.epochs")
    epochs.addHandler(lines)
    level = epochs.level
    epochs.setLevel(logging.INFO)  # as the CLI sets it
    try:
        comparison = compare(str(data), models=[TINY_MODEL], epochs=2, output=output, hidden_size=32, unfreeze="2",
                             options=fixture_options(output, tiny_weights))
    finally:
        epochs.removeHandler(lines)
        epochs.setLevel(level)
    (root / "epoch_lines.txt").write_text("\n".join(lines.said))
    return comparison


@pytest.fixture(scope="module")
def comparison_folder(compared: Comparison) -> Path:
    return compared.output


class EpochLines(logging.Handler):
    """The epoch lines as the console prints them."""

    def __init__(self) -> None:
        super().__init__()
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(record.getMessage())


def test_each_epoch_line_names_its_strategy_and_scratch_never_says_finetune(comparison_folder: Path) -> None:
    said = (comparison_folder.parent / "epoch_lines.txt").read_text().splitlines()
    by_strategy = {name: [line for line in said if line.split()[0] == name] for name in STRATEGIES}
    assert sum(map(len, by_strategy.values())) == len(said), "every line starts with its strategy"
    for name, lines in by_strategy.items():
        # Each run says its estimated time once, before its first epoch; then one line an epoch.
        assert "estimated time: about " in lines[0] and not any("estimated time" in line for line in lines[1:]), name
        by_strategy[name] = lines = lines[1:]
        history = read_rows(comparison_folder / name / "history.csv")
        assert len(lines) == len(history), name
    assert all(line.split()[1] == "all" for line in by_strategy["scratch"] + by_strategy["full"])
    assert {line.split()[1] for line in by_strategy["fine-tune"]} == {"frozen", "finetune"}


def test_the_images_are_audited_with_pretrained_features_not_the_scratch_runs(comparison_folder: Path) -> None:
    assert not (comparison_folder / "scratch" / "audit").exists(), "random features find nothing real"
    assert (comparison_folder / "frozen" / "audit" / "audit.json").is_file()
    splits = {name: (comparison_folder / name / "splits.csv").read_text() for name in STRATEGIES}
    assert len(set(splits.values())) == 1


def test_peak_val_accuracy_is_the_curves_peak_and_the_saved_models_is_its_starred_epoch(comparison_folder: Path) -> None:
    from transferkit.reporting.comparison import plot_comparison_curves
    from transferkit.run.comparison import Comparison

    rows = read_rows(comparison_folder / "comparison.csv")
    for row in rows:
        history = read_rows(comparison_folder / row["run"] / "history.csv")
        accuracies = [float(h["val_acc"]) for h in history]
        assert float(row["best_val_accuracy"]) == pytest.approx(max(accuracies))
        assert float(row["saved_val_accuracy"]) == pytest.approx(accuracies[int(row["epochs_to_best"]) - 1])
    typed = [{**row, "epochs_to_best": int(row["epochs_to_best"])} for row in rows]
    figure = plot_comparison_curves(Comparison(comparison_folder, typed))
    curves = [line for line in figure.axes[0].get_lines() if line.get_label() in {r["run"] for r in rows}]
    assert len({(line.get_marker(), line.get_linestyle()) for line in curves}) == len(rows), "no two curves alike"
    stars = [line for line in figure.axes[0].get_lines() if line.get_marker() == "*"]
    assert sorted(float(s.get_ydata()[0]) for s in stars) == pytest.approx(sorted(float(r["saved_val_accuracy"]) for r in rows))


def test_the_page_recommends_a_strategy_and_says_what_its_validation_images_resolve(comparison_folder: Path) -> None:
    page = (comparison_folder / "comparison.html").read_text()
    validation = [r for r in read_rows(comparison_folder / "frozen" / "splits.csv") if r["split"] == "val"]
    recommended = re.search(r'id="recommendation">Recommended: ([\w-]+) \(validation accuracy ([\d.]+)%', page)
    assert recommended and recommended.group(1) in STRATEGIES
    rows = {row["run"]: row for row in read_rows(comparison_folder / "comparison.csv")}
    best = max(float(row["saved_val_accuracy"]) for row in rows.values())
    chosen = float(rows[recommended.group(1)]["saved_val_accuracy"])
    assert chosen >= best - 1 / len(validation) - 1e-9, "the recommendation is the best, or within one image of it"
    assert f"{len(validation)} validation images resolve {100 / len(validation):.3g}-point steps" in page
    assert "seeds" not in page


def test_compare_help_says_what_each_strategy_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    said = capsys.readouterr().out
    assert "seeds" not in said and "no pretrained weights" in said


def test_every_strategy_trains_what_it_says_on_one_split(comparison_folder: Path) -> None:
    rows = {row["strategy"]: row for row in read_rows(comparison_folder / "comparison.csv")}
    assert list(rows) == list(STRATEGIES)
    trainable = {name: int(row["trainable_parameters"]) for name, row in rows.items()}
    total = int(rows["full"]["total_parameters"])
    assert trainable["scratch"] == trainable["full"] == total, "every layer trains"
    assert trainable["frozen"] < trainable["frozen-dense"] < total, "the dense layer adds parameters"
    assert trainable["frozen"] < trainable["fine-tune"] < total, "the top blocks train, the bottom does not"
    for row in rows.values():
        assert 0 <= float(row["best_val_accuracy"]) <= 1 and 0 <= float(row["test_accuracy"]) <= 1
        assert 1 <= int(row["epochs_to_best"]) <= int(row["epochs"]) <= 4
        assert float(row["wall_seconds"]) > 0
    assert int(rows["fine-tune"]["epochs"]) > 2, "head epochs, then fine-tuning epochs"

    splits = {name: (comparison_folder / name / "splits.csv").read_text() for name in STRATEGIES}
    assert len(set(splits.values())) == 1, "every run trains and is judged on the same images"
    configs = {name: (comparison_folder / name / "config.yaml").read_text() for name in STRATEGIES}
    assert "weights: none" in configs["scratch"] and "batchnorm: train" in configs["scratch"]
    assert "hidden_size: 32" in configs["frozen-dense"]


def test_runs_that_freeze_the_backbone_share_its_features(comparison_folder: Path) -> None:
    rows = {row["strategy"]: row for row in read_rows(comparison_folder / "comparison.csv")}
    images = sum(1 for _ in (comparison_folder / "frozen" / "splits.csv").open()) - 1
    assert rows["frozen"]["features_from_cache"] == "0", "the first frozen run computes them"
    assert rows["frozen-dense"]["features_from_cache"] == str(images)
    # Fine-tuning on activations (the default, auto) runs the backbone once more, for the
    # activations, and its features come out of that same pass.
    assert rows["fine-tune"]["features_from_cache"] == "0"
    assert rows["scratch"]["features_from_cache"] == rows["full"]["features_from_cache"] == "", "no frozen phase"


def test_comparison_page_and_figures(comparison_folder: Path) -> None:
    for name in ("curves.png", "accuracy.png"):
        with Image.open(comparison_folder / name) as image:
            image.load()
            assert image.width > 800 and image.height > 300
    page = (comparison_folder / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 2, "both figures are embedded"
    links = re.findall(r'href="([^"]+)"', page)
    assert sorted(links) == sorted(f"{name}/report.html" for name in STRATEGIES)
    assert all((comparison_folder / link).is_file() for link in links)
    for text in STRATEGIES.values():
        assert text.replace("'", "&#x27;") in page


def test_rerun_keeps_finished_runs_and_other_settings_are_refused(comparison_folder: Path, tiny_weights: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in comparison_folder.glob("*/metrics.json")}
    data = read_rows(comparison_folder / "frozen" / "splits.csv")[0]["path"]
    source = str(Path(data).parents[1])
    started = time.perf_counter()
    compare(source, models=[TINY_MODEL], epochs=2, output=comparison_folder, hidden_size=32,
            unfreeze="2", options=fixture_options(comparison_folder, tiny_weights))
    assert time.perf_counter() - started < 30
    # Progress bars on or off (a resume piped to a file) is the same comparison.
    compare(source, models=[TINY_MODEL], epochs=2, output=comparison_folder, hidden_size=32,
            unfreeze="2", options={**fixture_options(comparison_folder, tiny_weights), "progress": True})
    assert {p: p.stat().st_mtime_ns for p in comparison_folder.glob("*/metrics.json")} == before
    with pytest.raises(ConfigError, match="other settings \\(epochs 2 there, 3 now\\)"):
        compare(source, models=[TINY_MODEL], epochs=3, output=comparison_folder, hidden_size=32,
                unfreeze="2", options=fixture_options(comparison_folder, tiny_weights))
    # A default that moved (here --unfreeze's) is named with both values, not as "the same options".
    with pytest.raises(ConfigError, match="other settings \\(unfreeze '2' there, 'auto' now\\)"):
        compare(source, models=[TINY_MODEL], epochs=2, output=comparison_folder, hidden_size=32,
                options=fixture_options(comparison_folder, tiny_weights))


def test_killed_comparison_resumes_without_redoing_finished_runs(tmp_path: Path, tiny_weights: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=40)
    output = tmp_path / "comparison"
    command = [
        sys.executable, "-m", "transferkit.cli", "compare", str(data), "--strategies", "frozen,full",
        "--models", TINY_MODEL, "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0",
        "--epochs", "12", "--patience", "12", "--output", str(output), "--no-progress", "--no-report",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = output / "full" / "checkpoints" / "finetune-last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the comparison finished before it could be killed"
    frozen_metrics = (output / "frozen" / "metrics.json").stat().st_mtime_ns
    assert not (output / "full" / "metrics.json").exists()

    assert main(command[3:]) == 0
    assert (output / "frozen" / "metrics.json").stat().st_mtime_ns == frozen_metrics, "finished run kept"
    epochs = [int(r["epoch"]) for r in read_rows(output / "full" / "history.csv")]
    assert epochs == list(range(1, len(epochs) + 1)), "the killed run continued: no epoch twice, none missing"
    assert [r["strategy"] for r in read_rows(output / "comparison.csv")] == ["frozen", "full"]


def test_compare_command_prints_the_table_and_rejects_unknown_strategies(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_folder(tmp_path / "data", per_class=12)
    common = ["--models", TINY_MODEL, "--weights", str(tiny_weights), "--image-size", "64", "--num-workers", "0",
              "--epochs", "1", "--no-progress", "--no-report", "--output", str(tmp_path / "out")]
    assert main(["compare", str(data), "--strategies", "frozen,fine-tun", *common]) == 2
    error = capsys.readouterr().err
    assert "unknown strategy 'fine-tun'" in error and "did you mean" in error.lower()
    assert main(["compare", str(data), "--strategies", "frozen,fine-tune", "--max-per-class", "8", *common]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^frozen\s+test_efficientnet\s+\d\.\d{4}", printed, re.M)
    assert re.search(r"^fine-tune\s+test_efficientnet\s+\d\.\d{4}", printed, re.M)
    train_rows = [r for r in read_rows(tmp_path / "out" / "frozen" / "splits.csv") if r["split"] == "train"]
    assert len(train_rows) == 16, "--max-per-class 8 keeps 8 training images of each class"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATASETS / "hymenoptera").is_dir(), reason="needs ../shared/datasets")
def test_pretrained_strategies_beat_scratch_on_hymenoptera(tmp_path: Path) -> None:
    comparison = compare(
        str(SHARED_DATASETS / "hymenoptera"), strategies=["scratch", "frozen"], epochs=2,
        output=tmp_path / "comparison",
        options={"data.max_per_class": 40, "data.image_size": 160, "progress": False, "report": False},
    )
    accuracy = {row["strategy"]: row["saved_val_accuracy"] for row in comparison.rows}
    assert accuracy["frozen"] >= 0.85 and accuracy["frozen"] > accuracy["scratch"] + 0.2


def test_the_comparison_reads_well_in_a_notebook_and_as_a_dataframe(compared: Comparison) -> None:
    import pandas as pd

    assert len(repr(compared)) < 200 and all(row["strategy"] in repr(compared) for row in compared.rows)
    table = compared.to_pandas()
    written = pd.read_csv(compared.output / "comparison.csv")
    assert list(table.columns) == list(written.columns)
    assert list(table["strategy"]) == list(written["strategy"])
    assert np.allclose(table["saved_val_accuracy"], written["saved_val_accuracy"], atol=1e-6)
    page = compared._repr_html_()
    assert page.count("<tr>") == 1 + len(compared.rows)
    assert all(f"<td>{row['strategy']}</td>" in page for row in compared.rows)
    assert page.count("data:image/png;base64,") == 1, "the validation curves"
