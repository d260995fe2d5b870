"""The figures of a run's report, saved beside it in RUN/figures: charts as PNG, grids of
photos as JPEG, heat-map grids where grad-cam is installed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transferkit._io import atomic_write
from transferkit.reporting.figures import (
    FIGURE_DPI,
    GRID_IMAGES,
    literal_text,
    plot_confusion_matrix,
    plot_image_grid,
    plot_per_class_f1,
    plot_reliability,
    plot_training_curves,
    pyplot,
    sample_rows,
)
from transferkit.reporting.run_summary import RunSummary
from transferkit.run.folder import RunFolder

log = logging.getLogger(__name__)


FIGURES = ("training_curves", "per_class_f1", "confusion_matrix", "reliability", "sample_predictions", "highest_loss")


# Grids of photos (four per run, most of the report's size): as PNG 1.7-2 MB each and 0.9 s to
# save, half of it in the PNG encoder; as JPEG 0.3 MB and 0.4 s, with no visible loss.
PHOTO_GRIDS = ("sample_predictions", "highest_loss", "highest_loss_heatmaps", "most_confused_heatmaps")


JPEG_QUALITY = 90


def write_figures(run: RunSummary, folder: Path | None = None) -> dict[str, Path]:
    """Every figure of a run in ``folder`` (default RUN/figures); returns name -> path."""
    plt = pyplot()
    run_folder = RunFolder(run.run_dir)
    folder = folder or run_folder.writable(run_folder.figures_dir)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = run.evaluation
    builders = {
        "training_curves": lambda: plot_training_curves([e.as_row() for e in run.history]) if run.history else None,
        "per_class_f1": lambda: plot_per_class_f1(metrics, run.split),
        "confusion_matrix": lambda: plot_confusion_matrix(metrics, run.classes, run.split),
        "reliability": lambda: plot_reliability(metrics, run.split),
        "sample_predictions": lambda: plot_image_grid(
            grid_rows(run)["sample_predictions"], f"Sample predictions, {run.split} split"
        ),
        "highest_loss": lambda: plot_image_grid(
            grid_rows(run)["highest_loss"], f"Highest-loss images, {run.split} split", file_names=True
        ),
    }
    builders.update(_heatmap_builders(run))
    written = {}
    for name, build in builders.items():
        figure = build()
        if figure is None:
            continue
        photos = name in PHOTO_GRIDS
        path = folder / f"{name}.{'jpg' if photos else 'png'}"
        options = {"format": "jpeg", "pil_kwargs": {"quality": JPEG_QUALITY}} if photos else {"format": "png"}
        with literal_text():  # tick labels are laid out again when drawn
            _lay_out_once(figure)
            atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=FIGURE_DPI, **options))
        if photos:  # a folder drawn before grids were JPEG keeps no stale PNG of the grid
            path.with_suffix(".png").unlink(missing_ok=True)
        plt.close(figure)
        written[name] = path
    return written


def grid_rows(run: RunSummary) -> dict[str, list[dict[str, Any]]]:
    """The images of the two photo grids, so the report's words about them name the same images."""
    return {"sample_predictions": sample_rows(run.predictions),
            "highest_loss": run.evaluation.get("highest_loss", [])[:GRID_IMAGES]}


def most_confused_rows(run: RunSummary, count: int = GRID_IMAGES) -> list[dict[str, Any]]:
    """The images behind the most-confused pairs table, pair by pair, most confident first."""
    rows: list[dict[str, Any]] = []
    for pair in run.evaluation.get("most_confused", []):
        found = [r for r in run.predictions if (r["label"], r["predicted"]) == (pair["label"], pair["predicted"])]
        rows += sorted(found, key=lambda r: -float(r["confidence"]))
    return rows[:count]


def _lay_out_once(figure: Any) -> None:
    """Place the axes now, at the saved resolution, and keep them there. With its layout engine
    still set, ``savefig`` draws the whole figure twice, once only to lay it out, and a grid's
    sixteen pictures are resampled each time; the file comes out the same."""
    figure.set_dpi(FIGURE_DPI)
    engine = figure.get_layout_engine()
    if engine is not None:
        engine.execute(figure)
        # None alone installs whatever engine a matplotlibrc asks for (``figure.autolayout``),
        # which would lay the figure out again, or refuse to, next to a colorbar.
        with pyplot().rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
            figure.set_layout_engine(None)


def _heatmap_builders(run: RunSummary) -> dict[str, Callable[[], Any]]:
    """Heat-map versions of the highest-loss and most-confused grids: where the model found the
    label it predicted. Only with grad-cam installed; none for a grid with no images."""
    from transferkit.reporting.explain import (
        ExplainUnavailable,
        grad_cam_available,
        heat_overlay,
        load_explainer,
    )

    if not grad_cam_available():
        return {}
    grids = {
        "highest_loss_heatmaps": (grid_rows(run)["highest_loss"], "Highest-loss images"),
        "most_confused_heatmaps": (most_confused_rows(run), "Most-confused images"),
    }
    explainers: list[Any] = []  # loaded once, by the first grid drawn
    # The most-confused images are mostly among the highest-loss ones: each is explained once
    # (a backward pass per image is most of these grids' cost, a few seconds of every train).
    explained: dict[str, Any] = {}

    def build(rows: list[dict[str, Any]], title: str) -> Any:
        if not explainers:
            try:
                explainers.append(load_explainer(run.run_dir))
            except ExplainUnavailable as error:  # a backbone without a map to hook: the report goes on without
                log.info("no heat-map grids in the report: %s", error)
                explainers.append(None)
        if explainers[0] is None:
            return None
        missing = [r["path"] for r in rows if r["path"] not in explained]
        for e in explainers[0].explain(missing, unreadable={}):
            explained[e.path] = heat_overlay(e.image, e.heatmap)
        return plot_image_grid(rows, f"{title}, {run.split} split: where the model found its prediction "
                                     f"(red; {explainers[0].method})", [explained.get(r["path"]) for r in rows],
                               file_names=True)

    return {name: (lambda rows=rows, title=title: build(rows, title)) for name, (rows, title) in grids.items() if rows}
