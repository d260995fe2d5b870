from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import COLOURS, make_image, serving
from transferkit._io import read_csv_rows
from transferkit.evaluate import predict
from transferkit.serve import ServeLimits, create_app

LIMITS = ServeLimits(top_k=2, max_file_bytes=20_000, max_files=3, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def server(trained_run: Path) -> Iterator[str]:
    with serving(create_app(trained_run, LIMITS)) as url:
        yield url


def val_images(run_dir: Path) -> list[str]:
    return [row["path"] for row in read_csv_rows(run_dir / "splits.csv") if row["split"] == "val"]


def post(server: str, *files: tuple[str, bytes], **params: object) -> requests.Response:
    return requests.post(f"{server}/predict", files=[("file", f) for f in files], params=params, timeout=30)


def test_health_and_model_describe_the_run(server: str) -> None:
    assert requests.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    model = requests.get(f"{server}/model", timeout=10).json()
    assert model["classes"] == ["blue", "green", "red"] and model["num_classes"] == 3
    assert model["architecture"] == "test_efficientnet"
    assert model["preprocessing"]["input_size"] == [3, 64, 64]
    assert model["limits"]["max_files"] == 3
    page = requests.get(server, timeout=10)
    assert page.headers["content-type"].startswith("text/html") and 'id="drop"' in page.text


def test_predict_answers_what_the_python_api_answers(server: str, trained_run: Path) -> None:
    paths = val_images(trained_run)[:3]
    response = post(server, *((Path(p).name, Path(p).read_bytes()) for p in paths))

    assert response.status_code == 200
    answers = response.json()["predictions"]
    expected = predict(trained_run, paths, top_k=2).predictions
    assert [a["filename"] for a in answers] == [Path(p).name for p in paths]
    for answer, reference in zip(answers, expected):
        assert [t["label"] for t in answer["top_k"]] == reference.labels
        np.testing.assert_allclose([t["probability"] for t in answer["top_k"]], reference.probabilities, atol=1e-5)

    one = post(server, (Path(paths[0]).name, Path(paths[0]).read_bytes()), top_k=1).json()["predictions"][0]
    assert [t["label"] for t in one["top_k"]] == expected[0].labels[:1]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_get_clear_4xx_answers_and_the_server_keeps_serving(server: str, trained_run: Path, tmp_path: Path) -> None:
    good = make_image(tmp_path / "good.jpg", COLOURS["red"], seed=1).read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    cases = {
        "no file": (requests.post(f"{server}/predict", timeout=10), 400, "no image in the request"),
        "text saved as .jpg": (post(server, ("notes.jpg", b"hello, not a picture")), 415, "notes.jpg: not an image in any format Pillow reads"),
        "empty file": (post(server, ("empty.jpg", b"")), 415, "empty.jpg: empty file (0 bytes)"),
        "truncated jpeg": (post(server, ("cut.jpg", good[: len(good) // 2])), 415, "cut.jpg: truncated or corrupt image data"),
        "file too large": (post(server, ("noise.png", png_bytes(Image.fromarray(noise)))), 413, "noise.png is over the 20,000-byte limit"),
        "request too large": (post(server, ("huge.bin", bytes(100_000))), 413, "request of 100,"),
        "decompression bomb": (post(server, ("bomb.png", png_bytes(Image.new("1", (4000, 4000))))), 413, "bomb.png: 4000x4000 pixels is over the 1,000,000-pixel limit; send a smaller image"),
        "too many files": (post(server, *[(f"{i}.jpg", good) for i in range(4)]), 400, "Too many files"),
        "top_k out of range": (post(server, ("good.jpg", good), top_k=9), 422, "top_k must be between 1 and 3"),
    }
    for case, (response, status, message) in cases.items():
        assert response.status_code == status, case
        assert message in response.json()["detail"], case

    assert requests.get(f"{server}/health", timeout=10).status_code == 200
    assert post(server, ("good.jpg", good)).json()["predictions"][0]["top_k"][0]["label"] == "red"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_the_page_shows_the_predicted_class_of_an_uploaded_image(server: str, trained_run: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    image = val_images(trained_run)[0]
    expected = predict(trained_run, [image], top_k=2).predictions[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server)
        page.wait_for_function("document.getElementById('about').textContent.includes('3 classes')")
        page.set_input_files("#file", image)
        page.wait_for_selector("#predictions li")
        labels = page.locator("#predictions .label").all_inner_texts()
        shown = page.locator("#predictions .probability").first.inner_text()
        assert page.locator("#preview").evaluate("img => img.complete && img.naturalWidth > 0")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()

    assert labels == expected.labels
    assert shown == f"{100 * expected.probabilities[0]:.1f}%"
    assert Image.open(tmp_path / "page.png").size[0] > 300
