"""Export a trained run (ONNX float, ONNX int8, TorchScript) and serve it: file sizes, parity with
the eager model, accuracy change, and the server's latency per image.

    python benchmarks/export_serve.py RUN [--requests 100]

Each export goes to a temporary folder and is checked by ``transferkit.export`` on the run's
validation split. Each ONNX file and the run folder itself are then served by ``transferkit
serve`` in its own process on loopback; single-image requests (the image bytes read beforehand)
are timed end to end from this process, and so are requests of 16 images. The table between the
markers in benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from _results import write_section
from _serving import wait_until_serving
from transferkit._io import read_csv_rows
from transferkit.commands.export import export

HERE = Path(__file__).parent
BATCH = 16


def serve_latency(model: Path, images: list[bytes], count: int, port: int) -> dict[str, float]:
    command = [sys.executable, "-m", "transferkit.cli", "serve", str(model), "--port", str(port), "--max-files", str(BATCH)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, timeout=120)
        session = requests.Session()
        for data in images[:5]:  # warm-up: first requests pay for lazy initialisation
            session.post(f"{url}/predict", files={"file": ("warm.jpg", data)}, timeout=60).raise_for_status()
        single = []
        for n in range(count):
            data = images[n % len(images)]
            start = time.perf_counter()
            session.post(f"{url}/predict", files={"file": (f"{n}.jpg", data)}, timeout=60).raise_for_status()
            single.append(time.perf_counter() - start)
        batched = []
        for n in range(max(1, count // BATCH // 2)):
            files = [("file", (f"{i}.jpg", images[(n * BATCH + i) % len(images)])) for i in range(BATCH)]
            start = time.perf_counter()
            session.post(f"{url}/predict", files=files, timeout=120).raise_for_status()
            batched.append((time.perf_counter() - start) / BATCH)
    finally:
        server.terminate()
        server.wait(timeout=30)
    single.sort()
    return {
        "p50_ms": 1000 * statistics.median(single),
        "p95_ms": 1000 * single[int(0.95 * (len(single) - 1))],
        "batch_ms_per_image": 1000 * statistics.median(batched),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder")
    parser.add_argument("--requests", type=int, default=100, help="single-image requests per model (default: 100)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    val = [row["path"] for row in read_csv_rows(args.run / "splits.csv") if row["split"] == "val"]
    images = [Path(p).read_bytes() for p in val[: args.requests]]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        exports = {
            "ONNX float": export(args.run, output=Path(work) / "model.onnx"),
            "ONNX int8": export(args.run, quantize="int8", output=Path(work) / "model.int8.onnx"),
            "TorchScript": export(args.run, format="torchscript", output=Path(work) / "model.pt"),
        }
        for name, result in exports.items():
            latency = serve_latency(result.path, images, args.requests, args.port) if result.format == "onnx" else None
            rows.append((name, result, latency))
        rows.append(("run folder", None, serve_latency(args.run, images, args.requests, args.port)))

    checked = next(iter(exports.values()))
    lines = [
        f"Measured {datetime.date.today()} on {platform.machine()} with 2 cores "
        f"(`python benchmarks/export_serve.py {args.run}`), on {checked.images} validation images; "
        f"eager float accuracy {checked.reference_accuracy:.4f}. Latency: {args.requests} single-image "
        f"requests end to end on loopback (p50 / p95), and requests of {BATCH} images per image.",
        "",
        "| served | size (MB) | max abs prob. diff | accuracy | change | p50 (ms) | p95 (ms) | batch of 16 (ms/image) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result, latency in rows:
        size = f"{result.size_bytes / 1e6:.2f}" if result else ""
        parity = f"{result.max_abs_diff:.1e}" if result else ""
        accuracy = f"{result.accuracy:.4f}" if result else ""
        change = f"{result.accuracy - result.reference_accuracy:+.4f}" if result else ""
        timing = (f"{latency['p50_ms']:.1f} | {latency['p95_ms']:.1f} | {latency['batch_ms_per_image']:.1f}"
                  if latency else "not served | | ")
        lines.append(f"| {name} | {size} | {parity} | {accuracy} | {change} | {timing} |")
    table = "\n".join(lines)
    write_section("export_serve", "Export and serving", table)
    print(table)


if __name__ == "__main__":
    main()
