"""Real image folders made in tmp_path, and tiny real timm models with weights saved to a file."""

from __future__ import annotations

import contextlib
import csv
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from transferkit import train
from transferkit.config import TrainConfig

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TINY_MODEL = "test_efficientnet"

# Colours a tiny untrained backbone separates easily, so a short run learns them.
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def history_rows(run_dir: Path) -> list[dict[str, str]]:
    """A run's history.csv, one dict per epoch."""
    with (run_dir / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def make_folder(
    root: Path, per_class: int = 10, classes: tuple[str, ...] = ("blue", "red"), split: str = "", first_seed: int = 0
) -> Path:
    for k, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / split / name / f"{name}_{i:03d}.jpg", COLOURS[name], seed=first_seed + k * 1000 + i)
    return root


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Session fixtures write their feature cache here, never into the user's own cache."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("TRANSFERKIT_CACHE", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def feature_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test starts with an empty feature cache: what one test computed never leaks into another."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(folder))
    return folder / "features"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", per_class=25)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict of a real (tiny) timm model, saved as a user's weights file would be."""
    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def tiny_config(output: Path, weights: Path, **overrides: object) -> TrainConfig:
    """A config for a run that takes seconds; ``overrides`` are flat options, as
    ``TrainConfig.from_options`` takes them (``**{"frozen.epochs": 6}``)."""
    options: dict[str, object] = {
        "data.image_size": 64,
        "data.batch_size": 16,
        "data.num_workers": 0,
        "model.name": TINY_MODEL,
        "model.weights": str(weights),
        "frozen.epochs": 4,
        "frozen.lr": 0.01,
        "finetune.epochs": 1,
        "finetune.unfreeze": "2",
        "output": str(output),
        "progress": False,
        "report": False,
        "audit": False,
    }
    options.update(overrides)
    return TrainConfig.from_options(options)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    """One finished tiny three-class run with its report and one unreadable file, shared by the
    evaluate, predict and report tests (none of them changes it)."""
    root = tmp_path_factory.mktemp("trained")
    data = make_folder(root / "data", per_class=20, classes=("blue", "green", "red"))
    (data / "red" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    run_dir = root / "run"
    train(data, tiny_config(run_dir, tiny_weights, report=True))
    return run_dir


def run_cli_without_torch(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    """``transferkit ARGUMENTS`` in a process where importing torch, timm or torchvision fails,
    as on a machine without them."""
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['timm'] = None; sys.modules['torchvision'] = None\n"
        "from transferkit.cli import main\n"
        f"sys.exit(main({arguments!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port, in a thread of the test process."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


BROWSER_PROBE = (
    "<script>window.addEventListener('load',()=>{const i=[...document.images];"
    "document.body.setAttribute('data-images',i.length);"
    "document.body.setAttribute('data-decoded',i.filter(x=>x.complete&&x.naturalWidth>0).length);"
    "document.body.setAttribute('data-sections',document.querySelectorAll('h2').length);});</script>"
)


def render_in_chromium(page: str, folder: Path) -> dict[str, int]:
    """Debian's chromium loads the page; a probe script counts what it rendered: images, images
    actually decoded, h2 sections."""
    probed = folder / "probed.html"
    probed.write_text(page.replace("</body>", BROWSER_PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom",
         probed.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return {name: int(re.search(rf'data-{name}="(\d+)"', dom).group(1)) for name in ("images", "decoded", "sections")}
