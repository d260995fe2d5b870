"""Are transferkit's heat maps faithful? The deletion test on trained runs (issue 19's "done means").

    python benchmarks/explain_deletion.py RUN [RUN ...] [--methods gradcam,gradcam++,...] [--seed 0]

Measured with `python benchmarks/explain_deletion.py /tmp/trust/hym` (every method, 5 minutes on
2 cores) and `... /tmp/trust/flowers --methods gradcam,gradcam++,layercam` (13 minutes): default
`transferkit train` runs (EfficientNet-Lite0, 256 px) on the registered datasets.

For every image of each run's own validation split (images the model never trained on), the
predicted class's probability is measured before and after blurring 20% of the pixels, chosen
three ways:
- cam: the 20% the method's heat map ranks highest;
- random: a random 20%, drawn as the top of a smooth random map at the resolution of the
  backbone's last feature map (bilinearly upsampled, as a CAM is), so the baseline removes
  blobs of the same size as a heat map does rather than scattered pixels the network averages away;
- centre: a centred square of 20% of the area (photos tend to centre their subject).
The blur is Gaussian with sigma = a tenth of the input side (26 px at 256), strong enough that
a blurred insect or flower is a smear. A faithful map makes the cam drop clearly larger than
both baselines. Raw results go to benchmarks/explain_deletion.json; the table in RESULTS.md is
rebuilt from them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from _results import write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "explain_deletion.json"
sys.path.insert(0, str(HERE.parent / "src"))

from transferkit.run.folder import run_split_items  # noqa: E402
from transferkit.reporting.explain import METHODS, Explainer  # noqa: E402
from transferkit.inference.loading import load_predictor, load_run_model
from transferkit.inference.predictor import preprocessed_batches  # noqa: E402
from transferkit.run.folder import RunFolder  # noqa: E402

FRACTION = 0.2
BLUR_SIGMA = 0.1
"""Of the input side."""


def top_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """True on exactly ``fraction`` of the pixels of each (H, W) map: its highest; ties by position."""
    flat = scores.reshape(len(scores), -1)
    count = int(round(fraction * flat.shape[1]))
    order = np.argsort(-flat, axis=1, kind="stable")[:, :count]
    mask = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask.reshape(scores.shape)


def random_maps(count: int, side: int, grid: int, generator: np.random.Generator) -> np.ndarray:
    import torch

    noise = torch.from_numpy(generator.random((count, 1, grid, grid), dtype=np.float32))
    return torch.nn.functional.interpolate(noise, size=(side, side), mode="bilinear", align_corners=False)[:, 0].numpy()


def centre_mask(count: int, side: int, fraction: float) -> np.ndarray:
    box = int(round(np.sqrt(fraction) * side))
    start = (side - box) // 2
    mask = np.zeros((count, side, side), dtype=bool)
    mask[:, start:start + box, start:start + box] = True
    return mask


def measure(run_dir: Path, methods: list[str], seed: int) -> dict[str, object]:
    from scipy.ndimage import gaussian_filter

    model, torch_predictor = load_run_model(run_dir)
    predictor = load_predictor(run_dir)  # ONNX Runtime for the perturbed forwards: 4x eager on CPU
    split, items = run_split_items(run_dir, "val", predictor.classes)
    explainers = {method: Explainer(model, torch_predictor, method) for method in methods}
    side = int(predictor.preprocessing["input_size"][-1])
    import torch

    with torch.no_grad():
        grid = int(model.forward_features(torch.zeros(1, 3, side, side)).shape[-1])
    generator = np.random.default_rng(seed)
    drops: dict[str, list[np.ndarray]] = {name: [] for name in ["random", "centre", *methods]}
    started = time.perf_counter()
    for batch in preprocessed_batches([path for path, _ in items], predictor.preprocessing, 16, 2):
        before = predictor.probabilities_of_batch(batch)
        predicted = before.argmax(axis=1)
        rows = np.arange(len(batch))
        blurred = gaussian_filter(batch, sigma=(0, 0, BLUR_SIGMA * side, BLUR_SIGMA * side))

        def drop(mask: np.ndarray) -> np.ndarray:
            perturbed = np.where(mask[:, None], blurred, batch).astype(np.float32)
            return before[rows, predicted] - predictor.probabilities_of_batch(perturbed)[rows, predicted]

        drops["random"].append(drop(top_mask(random_maps(len(batch), side, grid, generator), FRACTION)))
        drops["centre"].append(drop(centre_mask(len(batch), side, FRACTION)))
        for method, explainer in explainers.items():
            heatmaps, _ = explainer.maps(batch, targets=list(predicted))
            drops[method].append(drop(top_mask(heatmaps, FRACTION)))
    seconds = time.perf_counter() - started
    joined = {name: np.concatenate(values) for name, values in drops.items()}
    conditions = {
        name: {"mean": float(values.mean()), "std": float(values.std(ddof=1)),
               # paired: on how many images the map's region costs more than the random region
               "beats_random": float((values > joined["random"]).mean()) if name in methods else None}
        for name, values in joined.items()
    }
    dataset = Path(RunFolder(run_dir).read_record()[0]).name
    return {"run": str(run_dir), "dataset": dataset, "split": split, "images": len(joined["random"]),
            "architecture": torch_predictor.info["architecture"], "layer": explainers[methods[0]].layer,
            "input_side": side, "feature_grid": grid, "seconds": round(seconds, 1), "conditions": conditions}


def table(entries: list[dict[str, object]]) -> str:
    lines = [
        f"Measured {date.today()} on {platform.machine()} with {os.cpu_count()} cores "
        "(`python benchmarks/explain_deletion.py RUN ...`). Drop in the predicted class's probability when "
        f"{FRACTION:.0%} of the pixels are blurred (Gaussian, sigma = {BLUR_SIGMA:g} x input side); mean ± standard "
        "deviation over the run's validation images; 'beats random': share of images where the map's region "
        "costs more than the random one. On the last map before average pooling and a linear head the gradient "
        "is the same in every cell, so hirescam and xgradcam give gradcam's map exactly (hymenoptera shows it); "
        "tf_flowers ran gradcam, gradcam++ and layercam only.", "",
        "| dataset | images | backbone (layer) | pixels blurred | drop | beats random |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        for name, c in e["conditions"].items():  # type: ignore[union-attr]
            beats = "" if c["beats_random"] is None else f"{c['beats_random']:.0%}"
            label = {"random": "random 20%", "centre": "centred box"}.get(name, f"top 20% of {name}")
            lines.append(f"| {e['dataset']} | {e['images']} | {e['architecture']} ({e['layer']}) | {label} | "
                         f"{c['mean']:.3f} ± {c['std']:.3f} | {beats} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    entries = [measure(run, args.methods.split(","), args.seed) for run in args.runs]
    done = {e["dataset"] for e in entries}
    raw = json.loads(RAW.read_text()) if RAW.exists() else []
    raw = [e for e in raw if e["dataset"] not in done] + entries
    RAW.write_text(json.dumps(raw, indent=1) + "\n")
    write_section("explain_deletion", "Are the heat maps faithful? (deletion test)", table(raw))


if __name__ == "__main__":
    main()
