from __future__ import annotations

import base64
import datetime
import html
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_folder, render_in_chromium, tiny_config
from transferkit import train
from transferkit.cli import main
from transferkit.reporting.figures import GRID_IMAGES, plot_confusion_matrix, plot_image_grid, plot_training_curves
from transferkit.reporting.explain import grad_cam_available
from transferkit.reporting.run_summary import read_run
from transferkit.reporting.run_figures import FIGURES, PHOTO_GRIDS, grid_rows, most_confused_rows, write_figures

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


def page_text(page: str) -> str:
    """The page's words as a reader sees them: tags dropped, entities decoded, spaces joined."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_the_report_opens_with_a_headline_and_a_real_title(trained_run: Path) -> None:
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    run = read_run(trained_run)
    accuracy, images = run.evaluation["accuracy"], run.evaluation["images"]
    words = {"val": "validation", "test": "test"}[run.split]
    said = f"blue, green and red, test_efficientnet, {accuracy:.1%} on {images} {words} images"
    trained = datetime.date.fromtimestamp((trained_run / "metrics.json").stat().st_mtime).isoformat()
    assert f"<title>{said}</title>" in page
    first = page_text(page.split('id="headline"')[0] + page.split('id="headline"')[1].split("</p>")[0])
    assert "Image classifier: blue, green and red" in first and f"{said} (trained {trained})" in first
    assert page.index('id="headline"') < page.index('id="metrics"'), "the headline comes first"


def test_the_report_reads_alone_with_no_link_to_a_file(trained_run: Path) -> None:
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    assert "file://" not in page and str(trained_run.resolve()) + "/" not in page.split('id="data"')[0]


def test_the_configuration_shows_the_split_the_run_really_used(trained_run: Path, tmp_path: Path, tiny_weights: Path) -> None:
    carved = page_text((trained_run / "report.html").read_text(encoding="utf-8").split('id="configuration"')[1])
    assert "split: 'carved at random: 80% train, 16% val, 4% test'" in carved

    for split in ("train", "val"):
        make_folder(tmp_path / "data" / split, per_class=8 if split == "train" else 3, classes=("blue", "red"))
    run_dir = tmp_path / "run"
    train(tmp_path / "data", tiny_config(run_dir, tiny_weights, report=True))
    page = page_text((run_dir / "report.html").read_text(encoding="utf-8"))
    assert "split: the folder's own train/ and val/ folders (--split not used)" in page
    assert "0.8 - 0.16" not in page and "- 0.04" not in page
    # 6 validation images: the unknown threshold rests on them, and the report says it cannot be trusted.
    warning = re.search(r'<p id="threshold" class="warning">([^<]+)</p>', (run_dir / "report.html").read_text())
    assert warning and "rests on 6 validation images" in html.unescape(warning.group(1))
    assert "too few to trust: at least 100 are needed" in html.unescape(warning.group(1))


def test_the_reliability_diagram_has_a_plain_sentence_with_the_runs_numbers(trained_run: Path) -> None:
    page = page_text((trained_run / "report.html").read_text(encoding="utf-8"))
    assert "when the model says 80%, it is right 80% of the time" in page
    run = read_run(trained_run)
    sure = [r for r in run.predictions if float(r["confidence"]) >= 0.9]
    if sure:
        right = sum(r["label"] == r["predicted"] for r in sure)
        assert f"of the {len(sure)} images it was at least 90% sure of, it got {right} right" in page


def test_the_highest_loss_images_carry_their_file_names(trained_run: Path) -> None:
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    table = page.split('id="highest_loss_files"')[1].split("</table>")[0]
    worst = read_run(trained_run).evaluation["highest_loss"]
    assert worst and all(html.escape(row["path"]) in table for row in worst[:GRID_IMAGES])


def test_no_two_texts_of_the_training_curves_overlap() -> None:
    """The fine-tuning line is named in the axis label: a label beside it met the ticks."""
    from matplotlib.text import Text

    history = [{"phase": "frozen" if e < 6 else "finetune", "train_acc": 0.5 + e / 40, "val_acc": 0.5 + e / 50,
                "train_loss": 1 - e / 20, "val_loss": 1 - e / 25} for e in range(10)]
    figure = plot_training_curves(history)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    drawn = [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]
    for axis in figure.axes:  # tick labels past the view limits are kept by matplotlib but never drawn
        for ticks, (low, high) in ((axis.xaxis, axis.get_xlim()), (axis.yaxis, axis.get_ylim())):
            drawn = [t for t in drawn if not any(t is tick.label1 and not low <= tick.get_loc() <= high
                                                 for tick in ticks.get_major_ticks())]
    boxes = [t.get_window_extent(renderer) for t in drawn]
    assert not [(a, b) for n, a in enumerate(boxes) for b in boxes[n + 1:] if a.overlaps(b)]
    legends = {t for axis in figure.axes for t in axis.get_legend().get_texts()}
    inside = [t.get_text() for t in drawn for axis in figure.axes
              if t not in legends and t.get_window_extent(renderer).overlaps(axis.get_window_extent(renderer))
              and t not in axis.get_xticklabels() + axis.get_yticklabels() and t is not axis.title]
    assert inside == [], "no text drawn over the curves or the axis line"
    assert "fine-tuning starts" in figure.axes[0].get_xlabel()


def test_the_image_grids_mark_the_images_answered_unknown(tmp_path: Path, tiny_weights: Path) -> None:
    # A threshold that keeps half of the validation images: the report's grids hold abstentions.
    data = make_folder(tmp_path / "data", per_class=16, classes=("blue", "green", "red"))
    run_dir = tmp_path / "run"
    train(data, tiny_config(run_dir, tiny_weights, report=True, unknown_keep=0.5, **{"data.split": (0.5, 0.5, 0.0)}))

    run = read_run(run_dir)
    assert run.split == "val"
    answered = {row["path"]: row["unknown"] == "true" for row in run.predictions}
    assert 0 < sum(answered.values()) < len(answered)
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    for name, rows in grid_rows(run).items():
        badged = [row for row in rows if answered[row["path"]]]
        figure = plot_image_grid(rows, name)
        drawn = [text.get_text() for axis in figure.axes for text in axis.texts]
        assert drawn.count("answered unknown") == len(badged), name
        if badged:
            assert html.escape(f'{len(badged)} of these {len(rows)} images are badged "answered unknown"') in page
    table = page.split('id="highest_loss_files"')[1].split("</table>")[0]
    for row in grid_rows(run)["highest_loss"]:
        cells = re.search(rf"<td>{re.escape(html.escape(row['path']))}</td>(.*?)</tr>", table).group(1)
        answer = re.findall(r"<td>([^<]*)</td>", cells)[-1]
        assert answer == ("unknown" if answered[row["path"]] else row["predicted"])
