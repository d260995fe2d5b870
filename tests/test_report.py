from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import render_in_chromium
from transferkit.cli import main
from transferkit.reporting.figures import plot_confusion_matrix
from transferkit.reporting.explain import grad_cam_available
from transferkit.reporting.report import read_run
from transferkit.reporting.run_figures import FIGURES, PHOTO_GRIDS, most_confused_rows, write_figures

SECTIONS = ("metrics", "phases", "figures", "data", "configuration", *FIGURES)


def expected_figures(run_dir: Path) -> set[str]:
    """Every figure; with grad-cam, the heat-map grids too (most-confused only when some image is)."""
    names = set(FIGURES)
    if grad_cam_available():
        names.add("highest_loss_heatmaps")
        if read_run(run_dir).evaluation.get("most_confused"):
            names.add("most_confused_heatmaps")
    return names


def figures_only(page: str) -> str:
    """The page without the near-copy pairs' thumbnails (the tiny backbone finds every noise image of
    one colour a near-copy of the others, so the fixture's run has them)."""
    return re.sub(r'<div id="leaks">.*?</div>', "", page, flags=re.S)


def embedded_images(page: str) -> list[Image.Image]:
    """Every picture embedded in the page, each checked to be what its data URL says it is."""
    images = []
    for kind, data in re.findall(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)"', page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == kind.upper(), f"a {image.format} embedded as image/{kind}"
        images.append(image)
    return images


def test_training_writes_every_figure_as_a_readable_image(trained_run: Path) -> None:
    for name in expected_figures(trained_run):
        photos = name in PHOTO_GRIDS
        path = trained_run / "figures" / f"{name}.{'jpg' if photos else 'png'}"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height, kind = *image.size, image.format
        assert kind == ("JPEG" if photos else "PNG"), f"{path.name} is a {kind}"
        assert 400 <= width <= 4000 and 250 <= height <= 4000, f"{path.name} is {width}x{height}"


def test_the_report_is_one_self_contained_file_with_every_section(trained_run: Path) -> None:
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'id="{section}"' in page, f"section {section} missing"
    assert "truncated.jpg" in page, "skipped files are listed"
    assert re.search(r'(src|href)="(?!data:)', page) is None, "nothing may load from outside the file"
    images = embedded_images(figures_only(page))
    assert len(images) == len(expected_figures(trained_run))
    assert all(image.size[0] >= 400 for image in images)


def test_report_of_two_runs_puts_them_side_by_side(trained_run: Path, tmp_path: Path) -> None:
    second = tmp_path / "second"
    shutil.copytree(trained_run, second)
    output = tmp_path / "both.html"

    assert main(["report", str(trained_run), str(second), "--output", str(output)]) == 0

    page = output.read_text(encoding="utf-8")
    comparison = page.split('id="comparison"')[1].split("</section>")[0]
    assert "run" in comparison and "second" in comparison and "accuracy" in comparison
    assert len(embedded_images(figures_only(page))) == 2 * len(expected_figures(trained_run))


def test_confusion_matrix_stays_readable_with_many_classes(trained_run: Path) -> None:
    classes = [f"class_{i:02d}" for i in range(60)]
    counts = torch.eye(60, dtype=torch.int64) * 5
    counts[3, 7] = 2
    metrics = {"confusion_matrix": counts.tolist(), "confusion_matrix_normalized": (counts / counts.sum(1, keepdim=True)).tolist()}
    figure = plot_confusion_matrix(metrics, classes, "test")
    width, height = figure.get_size_inches() * figure.dpi
    assert height >= 60 * 12, "at least about 12 pixels per class row"
    labels = [tick.get_text() for tick in figure.axes[0].get_yticklabels()]
    assert labels == classes, "every class is named, not numbered"


def test_figures_are_redrawn_from_the_run_folder_alone(trained_run: Path, tmp_path: Path) -> None:
    # A grid drawn as PNG by an earlier transferkit is replaced, not left beside the JPEG.
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "highest_loss.png").write_bytes(b"drawn by an earlier version")
    written = write_figures(read_run(trained_run), tmp_path / "figures")
    assert set(written) == expected_figures(trained_run)
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {p.name for p in written.values()}


def test_a_matplotlibrc_asking_for_another_layout_changes_no_figure(trained_run: Path, tmp_path: Path) -> None:
    import matplotlib

    run = read_run(trained_run)
    write_figures(run, tmp_path / "default")
    with matplotlib.rc_context({"figure.autolayout": True}):
        write_figures(run, tmp_path / "autolayout")
    names = sorted(path.name for path in (tmp_path / "default").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "autolayout").iterdir())
    for name in names:
        with Image.open(tmp_path / "default" / name) as default, Image.open(tmp_path / "autolayout" / name) as other:
            assert np.array_equal(np.asarray(default), np.asarray(other)), f"{name} is drawn differently"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package")
def test_the_report_renders_in_a_real_browser_with_every_image_decoded(trained_run: Path, tmp_path: Path) -> None:
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    rendered = render_in_chromium(page, tmp_path)
    # Every figure and every near-copy pair's thumbnail is drawn.
    assert rendered["decoded"] == rendered["images"] == len(embedded_images(page))
    assert len(embedded_images(figures_only(page))) == len(expected_figures(trained_run))
    assert rendered["sections"] >= 5


def test_class_names_with_dollar_signs_are_drawn_literally_in_every_figure(tmp_path: Path, tiny_weights: Path) -> None:
    from conftest import COLOURS, make_image, tiny_config
    from transferkit import train

    # matplotlib reads $...$ as maths: "US$_$x" failed the whole report, "a$b$c" drew "abc" in italics.
    names = {"US$_$x": COLOURS["blue"], "a$b$c": COLOURS["red"], "plain": COLOURS["green"]}
    for k, (name, colour) in enumerate(names.items()):
        for i in range(12):
            make_image(tmp_path / "data" / name / f"{i}.jpg", colour, seed=100 * k + i)
    run_dir = tmp_path / "run"
    train(tmp_path / "data", tiny_config(run_dir, tiny_weights, report=True))
    drawn = {p.name for p in (run_dir / "figures").iterdir()}
    assert drawn == {f"{name}.{'jpg' if name in PHOTO_GRIDS else 'png'}" for name in expected_figures(run_dir)}

    run = read_run(run_dir)
    figure = plot_confusion_matrix(run.evaluation, run.classes, run.split)
    figure.canvas.draw()  # drawn by the caller, outside the report's own settings
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert labels == sorted(names) and all(not label.get_parse_math() for label in figure.axes[0].get_yticklabels())


@pytest.mark.skipif(not grad_cam_available(), reason="needs pip install 'transferkit[explain]'")
def test_heat_map_grids_show_the_highest_loss_and_the_most_confused_images(trained_run: Path, tmp_path: Path) -> None:
    run = read_run(trained_run)
    # Two images filed as red and said to be blue: the run's most-confused pair, whatever it learnt.
    reds = run.predictions[:2]
    for row, confidence in zip(reds, ("0.6", "0.9")):
        row.update(label="red", predicted="blue", confidence=confidence)
    run.evaluation["most_confused"] = [{"label": "red", "predicted": "blue", "count": 2}]
    assert [r["path"] for r in most_confused_rows(run)] == [reds[1]["path"], reds[0]["path"]]  # surest first

    written = write_figures(run, tmp_path / "figures")
    assert {"highest_loss_heatmaps", "most_confused_heatmaps"} <= set(written)
    plain = coarse_colours(written["highest_loss"])
    for name in ("highest_loss_heatmaps", "most_confused_heatmaps"):
        # The jet colours over the images: far more colours than the same flat-colour images plain
        # (measured 124 and 98 against 53).
        assert coarse_colours(written[name]) > 1.5 * plain, name


def coarse_colours(path: Path) -> int:
    """Coarse colours that cover at least 0.05% of the picture: JPEG's ringing around the text and
    frames adds many colours of a few pixels each, to the plain grid as much as to the heat maps."""
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB")) // 32
    _, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    return int((counts >= 0.0005 * counts.sum()).sum())
