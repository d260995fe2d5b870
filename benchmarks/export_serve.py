"""Export a trained run to every installed format and precision, and time each file in its own
runtime: size, parity with the eager model, accuracy change, unknown agreement, single-image
latency (p50 / p95) and batch-16 throughput; then the served latency of the ONNX files and the
run folder through ``transferkit serve``.

    python benchmarks/export_serve.py RUN [--requests 100] [--variants | --int8]

Each export goes to a temporary folder and is checked by ``transferkit.commands.export`` on the
run's validation split, in its own runtime. Latency: preprocessed images (the run's validation
images, so the runtimes see real activations) through the Predictor's forward, batch 1 and
batch 16, after a warm-up. ``--variants`` adds ONNX static int8 with int8 activations (S8S8) and
with every operation quantised, and OpenVINO float at its default precision (bfloat16 on a CPU
that has it), to show why the defaults are what they are. ``--int8`` times only ONNX and OpenVINO,
float and int8, and LiteRT float, without serving, into its own section (int8 against float). The table between the
markers in benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from _results import cpu_name, write_section
from _serving import wait_until_serving
from transferkit._io import read_csv_rows
from transferkit.commands.export import ExportResult, export_all
from transferkit.export.formats import FORMATS
from transferkit.inference.loading import load_predictor
from transferkit.inference.predictor import preprocessed_batches

HERE = Path(__file__).parent
BATCH = 16
INT8_CHOICES = [("onnx", None), ("onnx", "int8"), ("openvino", None), ("openvino", "int8"), ("litert", None)]
CHOICES = [("onnx", None), ("onnx", "int8"), ("onnx", "int8-dynamic"), ("openvino", None), ("openvino", "int8"),
           ("litert", None), ("executorch", None), ("pt2", None), ("torchscript", None)]


def runtime_latency(forward: Any, images: np.ndarray, count: int) -> dict[str, float]:
    """Single images (p50 / p95 ms) and batches of 16 (images per second) through ``forward``."""
    for image in images[:5]:  # warm-up: first calls pay for lazy initialisation
        forward(image[None])
    single = []
    for n in range(count):
        start = time.perf_counter()
        forward(images[n % len(images)][None])
        single.append(time.perf_counter() - start)
    forward(images[:BATCH])
    batched = []
    for n in range(max(3, count // BATCH)):
        batch = np.ascontiguousarray(np.roll(images, -n * BATCH, axis=0)[:BATCH])
        start = time.perf_counter()
        forward(batch)
        batched.append(time.perf_counter() - start)
    single.sort()
    return {"p50_ms": 1000 * statistics.median(single), "p95_ms": 1000 * single[int(0.95 * (len(single) - 1))],
            "batch_images_per_s": BATCH / statistics.median(batched)}


def serve_latency(model: Path, images: list[bytes], count: int, port: int) -> dict[str, float]:
    command = [sys.executable, "-m", "transferkit.cli", "serve", str(model), "--port", str(port), "--max-files", str(BATCH)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, timeout=180)
        session = requests.Session()
        for data in images[:5]:
            session.post(f"{url}/predict", files={"file": ("warm.jpg", data)}, timeout=60).raise_for_status()
        single = []
        for n in range(count):
            start = time.perf_counter()
            session.post(f"{url}/predict", files={"file": (f"{n}.jpg", images[n % len(images)])}, timeout=60).raise_for_status()
            single.append(time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"p50_ms": 1000 * statistics.median(single)}


def variant_rows(run: Path, work: Path, rows: list, images: np.ndarray, count: int) -> list[tuple[str, ExportResult, dict]]:
    """The alternatives the defaults were chosen over, each with one setting changed."""
    from transferkit.export import onnx as onnx_export

    variants = []
    defaults = (onnx_export.STATIC_OPS, onnx_export.ACTIVATIONS)
    for label, ops, activations in [("ONNX int8 S8S8", defaults[0], "QInt8"), ("ONNX int8 U8S8, every op", None, "QUInt8")]:
        onnx_export.STATIC_OPS, onnx_export.ACTIVATIONS = ops, activations
        try:
            outcome = export_all(run, work / f"variant-{len(variants)}", choices=[("onnx", "int8")], max_accuracy_drop=100)
        finally:
            onnx_export.STATIC_OPS, onnx_export.ACTIVATIONS = defaults
        for result in outcome.results:
            variants.append((label, result, runtime_latency(load_predictor(result.path).forward, images, count)))
    openvino = next((result for label, result, _, _ in rows if label == "OpenVINO float"), None)
    if openvino is not None:  # the same file, compiled at OpenVINO's own default precision
        variants.append(("OpenVINO float, default precision", openvino,
                         runtime_latency(openvino_default_precision(openvino.path), images, count)))
    return variants


def openvino_default_precision(path: Path) -> Any:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU")
    request = compiled.create_infer_request()
    return lambda batch: request.infer({0: batch})[compiled.outputs[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder")
    parser.add_argument("--requests", type=int, default=100, help="single-image calls per file (default: 100)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--variants", action="store_true", help="also the settings the defaults were chosen over")
    parser.add_argument("--int8", action="store_true", help="only ONNX and OpenVINO (float, int8) and LiteRT float, not served")
    args = parser.parse_args()

    val = [row["path"] for row in read_csv_rows(args.run / "splits.csv") if row["split"] == "val"]
    reference = load_predictor(args.run)
    images = np.concatenate(list(preprocessed_batches(val[:64], reference.preprocessing, 32, 2)))
    jpegs = [Path(p).read_bytes() for p in val[: args.requests]]
    rows: list[tuple[str, ExportResult | None, dict, dict | None]] = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        choices = INT8_CHOICES if args.int8 else CHOICES
        installed = [(name, quantize) for name, quantize in choices if FORMATS[name].installed(quantize)]
        for name, quantize in choices:
            if (name, quantize) not in installed:
                print(f"{name} {quantize or ''}: not installed ({FORMATS[name].install})", flush=True)
        started = time.perf_counter()
        outcome = export_all(args.run, work, choices=installed, max_accuracy_drop=100)
        print(f"exported {len(outcome.results)} files in {time.perf_counter() - started:.0f} s; failed: {outcome.failed}",
              flush=True)
        for result in outcome.results:
            label = {"onnx": "ONNX", "openvino": "OpenVINO", "litert": "LiteRT", "executorch": "ExecuTorch",
                     "pt2": "torch.export", "torchscript": "TorchScript"}[result.format]
            label += f" {result.quantize}" if result.quantize else " float"
            timing = runtime_latency(load_predictor(result.path).forward, images, args.requests)
            served = (serve_latency(result.path, jpegs, args.requests, args.port)
                      if result.format in ("onnx", "openvino") and not args.int8 else None)
            print(f"{label}: {result.as_dict()} {timing} served {served}", flush=True)
            rows.append((label, result, timing, served))
        if args.variants:
            for label, result, timing in variant_rows(args.run, work, rows, images, args.requests):
                print(f"{label}: {result.as_dict()} {timing}", flush=True)
                rows.append((label, result, timing, None))
        if not args.int8:
            eager = runtime_latency(load_eager(args.run), images, args.requests)
            rows.append(("eager PyTorch (run folder)", None, eager,
                         serve_latency(args.run, jpegs, args.requests, args.port)))

    checked = next(result for _, result, _, _ in rows if result is not None)
    lines = [
        f"Measured {datetime.date.today()} on {cpu_name()} (`python benchmarks/export_serve.py {args.run}"
        f"{' --variants' if args.variants else ''}{' --int8' if args.int8 else ''}`), on {checked.images} validation images; eager float accuracy "
        f"{checked.reference_accuracy:.4f}. Each file is checked in its own runtime; latency is that runtime's forward "
        f"on preprocessed validation images: {args.requests} single images (p50 / p95) and batches of {BATCH}; "
        "served (ONNX, OpenVINO and the run folder): p50 of single-image requests end to end through `transferkit serve` on loopback. Unknown "
        "agreement: the file's answer (its own threshold, refitted for int8) against the run folder's.",
        "",
        "| file | size (MB) | max prob. diff | accuracy | change | unknown agreement | p50 (ms) | p95 (ms) "
        f"| batch of {BATCH} (images/s) | served p50 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result, timing, served in rows:
        size = f"{result.size_bytes / 1e6:.2f}" if result else ""
        parity = f"{result.max_abs_diff:.1e}" if result else ""
        accuracy = f"{result.accuracy:.4f}" if result else f"{checked.reference_accuracy:.4f}"
        change = f"{result.accuracy - result.reference_accuracy:+.4f}" if result else ""
        agreement = f"{result.unknown_agreement:.4f}" if result and result.unknown_agreement is not None else ""
        lines.append(f"| {name} | {size} | {parity} | {accuracy} | {change} | {agreement} | {timing['p50_ms']:.1f} | "
                     f"{timing['p95_ms']:.1f} | {timing['batch_images_per_s']:.0f} | "
                     f"{served['p50_ms']:.1f} |" if served else
                     f"| {name} | {size} | {parity} | {accuracy} | {change} | {agreement} | {timing['p50_ms']:.1f} | "
                     f"{timing['p95_ms']:.1f} | {timing['batch_images_per_s']:.0f} | |")
    lines += ["", *int8_ratios(rows)]
    table = "\n".join(lines)
    if args.int8:
        write_section("export_int8", "int8 against float", table)
    else:
        write_section("export_serve", "Export and serving", table)
    print(table)


def int8_ratios(rows: list) -> list[str]:
    """One line per runtime with a float and an int8 file: how much faster and smaller int8 is."""
    found = {name: (result, timing) for name, result, timing, _ in rows}
    lines = []
    for runtime in ("ONNX", "OpenVINO"):
        if f"{runtime} float" in found and f"{runtime} int8" in found:
            (float_file, slow), (int8_file, fast) = found[f"{runtime} float"], found[f"{runtime} int8"]
            lines.append(f"{runtime} int8 against {runtime} float: {slow['p50_ms'] / fast['p50_ms']:.2f}x faster at "
                         f"batch 1 (p50), {fast['batch_images_per_s'] / slow['batch_images_per_s']:.2f}x at batch "
                         f"{BATCH}, {float_file.size_bytes / int8_file.size_bytes:.2f}x smaller.")
    return lines


def load_eager(run: Path) -> Any:
    """The run's model in eager PyTorch on CPU, as every export is checked against."""
    from transferkit.inference.loading import load_run_model

    return load_run_model(run)[1].forward


if __name__ == "__main__":
    main()
