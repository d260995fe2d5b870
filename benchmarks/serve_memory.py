"""The memory of `transferkit serve` under load: its resident set (RSS) idle, at its peak while
concurrent clients each post a request of small JPEGs, idle again afterwards, and at its peak over
one request of 16 large PNGs (6000 x 6600 px, just under the default 40-megapixel limit),
sent first, to a server that has answered one small request.

    python benchmarks/serve_memory.py RUN [--clients 40] [--label "this tree"]
    # the code before a change, unpacked beside the installed package:
    git archive HEAD src | tar -x -C /tmp/before
    python benchmarks/serve_memory.py RUN --pythonpath /tmp/before/src --label HEAD

The server runs in its own process on loopback with the default limits (only `--port` and
`--max-files` are passed, so older versions serve too). The peak is the kernel's high-water
mark (VmHWM, reset through /proc/PID/clear_refs before each phase). A client answered 503 waits
for its Retry-After and sends again, so every version does the same work. Raw results
accumulate in benchmarks/serve_memory.json, one entry per label; the table between the markers
in benchmarks/RESULTS.md is rebuilt from them.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from _results import write_section
from _serving import wait_until_serving
from transferkit._io import read_csv_rows

HERE = Path(__file__).parent
RAW = HERE / "serve_memory.json"
FILES = 16
PNG_SIZE = (6000, 6600)


def memory_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def reset_peak(pid: int) -> None:
    # Writing 5 resets the high-water mark to the current RSS (Linux >= 4.0).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def large_png() -> bytes:
    """A smooth 6000 x 6600 picture: a few MB as PNG, 119 MB decoded."""
    width, height = PNG_SIZE
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                       (x + y) / 2], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def post(url: str, files: list[tuple[str, bytes]], retries: list[int]) -> None:
    """One request, sent again after each 503's Retry-After until it is answered."""
    while True:
        response = requests.post(f"{url}/predict", files=[("file", f) for f in files], timeout=600)
        if response.status_code != 503:
            response.raise_for_status()
            return
        retries.append(1)
        time.sleep(float(response.headers.get("retry-after", 1)))


def measure(run: Path, clients: int, port: int, pythonpath: str | None) -> dict[str, float]:
    val = [row["path"] for row in read_csv_rows(run / "splits.csv") if row["split"] == "val"]
    jpegs = [(Path(p).name, Path(p).read_bytes()) for p in val]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "transferkit.cli", "serve", str(run), "--port", str(port), "--max-files", str(FILES)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, timeout=180)
        post(url, jpegs[:FILES], [])  # warm-up: the first request pays for lazy initialisation
        result = {"idle_mib": memory_mib(server.pid, "VmRSS")}

        png = large_png()
        reset_peak(server.pid)
        post(url, [(f"large{i}.png", png) for i in range(FILES)], [])
        result["png_peak_mib"] = memory_mib(server.pid, "VmHWM")
        result["png_mb"] = len(png) / 1e6
        del png

        reset_peak(server.pid)
        retries: list[int] = []
        start = time.perf_counter()
        threads = [
            threading.Thread(target=post, args=(url, [jpegs[(c * FILES + i) % len(jpegs)] for i in range(FILES)], retries))
            for c in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result["burst_seconds"] = time.perf_counter() - start
        result["burst_peak_mib"] = memory_mib(server.pid, "VmHWM")
        result["retries"] = len(retries)
        time.sleep(5)
        result["idle_after_mib"] = memory_mib(server.pid, "VmRSS")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return result


def table(results: dict[str, dict[str, float]], clients: int) -> str:
    lines = [
        f"Measured {datetime.date.today()} on {platform.machine()} with {os.cpu_count()} cores "
        f"(`python benchmarks/serve_memory.py RUN`), default limits, EfficientNet-Lite0 run folder. "
        f"Burst: {clients} concurrent clients, each one request of {FILES} validation JPEGs "
        f"(hymenoptera, 130 KB on average); a 503 is retried after its Retry-After. "
        f"Large: one request of {FILES} PNGs of {PNG_SIZE[0]} x {PNG_SIZE[1]} px, before the burst. RSS in MiB.",
        "",
        "| server | idle | large PNGs peak | burst peak | idle after burst | retries (503) | burst (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(f"| {label} | {r['idle_mib']:.0f} | {r['png_peak_mib']:.0f} | {r['burst_peak_mib']:.0f} | "
                     f"{r['idle_after_mib']:.0f} | {r['retries']:.0f} | {r['burst_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder")
    parser.add_argument("--clients", type=int, default=40, help="concurrent clients in the burst (default: 40)")
    parser.add_argument("--label", default="this tree", help="the row's name (default: this tree)")
    parser.add_argument("--pythonpath", help="serve the transferkit package under this folder instead")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()

    results = json.loads(RAW.read_text()) if RAW.exists() else {}
    results[args.label] = measure(args.run, args.clients, args.port, args.pythonpath)
    RAW.write_text(json.dumps(results, indent=1) + "\n")
    text = table(results, args.clients)
    write_section("serve_memory", "Serving memory", text)
    print(text)


if __name__ == "__main__":
    main()
