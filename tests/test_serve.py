from __future__ import annotations

import contextlib
import io
import select
import shutil
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
import requests
from PIL import Image

from conftest import COLOURS, make_image, serving
from transferkit._io import read_csv_rows
from transferkit.cli import main
from transferkit.errors import ConfigError
from transferkit.commands.predict import predict
from transferkit.commands.serve_app import ServeLimits, create_app

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
        assert answer["answer"] == reference.answer and answer["unknown"] == reference.unknown
        assert answer["unknown_score"] == pytest.approx(reference.unknown_score, abs=1e-5)

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


@contextlib.contextmanager
def browser_page(server: str, *arguments: str) -> Iterator[Any]:
    """Debian's chromium on the serve page, the model's description loaded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox", *arguments])
        page = browser.new_page()
        page.goto(server)
        page.wait_for_function("document.getElementById('about').textContent.includes('3 classes')")
        try:
            yield page
        finally:
            browser.close()


def cards(page: Any, count: int) -> list[dict[str, Any]]:
    """What each result card shows once ``count`` of them are answered."""
    page.wait_for_function(f"document.querySelectorAll('#results .card .bars, #results .card .error').length >= {count}")
    return page.eval_on_selector_all("#results .card", """cards => cards.map(card => ({
        file: card.querySelector('.file').textContent,
        answer: card.querySelector('.answer').textContent,
        labels: [...card.querySelectorAll('.bars .label')].map(l => l.textContent),
        percents: [...card.querySelectorAll('.bars .probability')].map(l => l.textContent),
        bar_colours: [...card.querySelectorAll('.bars .bar')].map(b => getComputedStyle(b).backgroundColor),
        text: card.innerText,
        pictures: [...card.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0),
    }))""")


GREEN, GREY, AMBER = "rgb(27, 158, 85)", "rgb(181, 181, 181)", "rgb(211, 154, 44)"


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_the_page_classifies_several_images_at_once_each_in_its_own_card(server: str, trained_run: Path) -> None:
    images = val_images(trained_run)[:3]
    expected = predict(trained_run, images, top_k=2).predictions
    with browser_page(server) as page:
        page.set_input_files("#file", images)
        shown = cards(page, 3)
        camera_offered = page.locator("#camera").is_visible()

    assert [c["file"] for c in shown] == [Path(p).name for p in images]
    for card, reference in zip(shown, expected):
        assert card["labels"] == reference.labels
        assert card["percents"][0] == f"{100 * reference.probabilities[0]:.1f}%"
        assert card["pictures"] == [True], "the image, drawn as the model frames it"
        if not reference.unknown:
            assert card["answer"].startswith(reference.labels[0])
            assert card["bar_colours"][0] == (GREEN if reference.probabilities[0] >= 0.6 else AMBER)
    assert not camera_offered, "no camera button where the browser has no camera"


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_an_abstention_says_not_one_of_the_classes_with_grey_bars_and_no_score(server: str, tmp_path: Path) -> None:
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    expected = post(server, ("noise.png", noise.read_bytes())).json()["predictions"][0]
    assert expected["answer"] == "unknown"
    with browser_page(server) as page:
        page.set_input_files("#file", str(noise))
        (card,) = cards(page, 1)

    assert card["answer"] == "None of these: not one of: blue, green, red"
    assert card["labels"] == [t["label"] for t in expected["top_k"]]  # what it would say if forced, still shown
    assert set(card["bar_colours"]) == {GREY}, "no green bar contradicts the abstention"
    assert "score" not in card["text"] and f"{expected['unknown_score']:.3f}" not in card["text"]


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_a_refused_upload_shows_its_reason_and_no_broken_picture(server: str, trained_run: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"hello, not a picture")
    good = val_images(trained_run)[0]
    with browser_page(server) as page:
        page.set_input_files("#file", [str(notes), good])
        refused, answered = cards(page, 2)

    assert "notes.png: not an image in any format Pillow reads" in refused["answer"]
    assert refused["pictures"] == [] and refused["labels"] == []
    assert answered["pictures"] == [True] and len(answered["labels"]) == 2


def test_heat_map_and_preview_frame_the_image_alike(server: str, tmp_path: Path) -> None:
    """The page's frame shows the centre square the model crops; the heat map is drawn over the
    same square, so the two line up (a wide image's left and right thirds are outside both)."""
    pytest.importorskip("pytorch_grad_cam")
    if chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    wide = np.zeros((60, 180, 3), np.uint8)
    wide[:, :60], wide[:, 60:120], wide[:, 120:] = COLOURS["red"], COLOURS["green"], COLOURS["blue"]
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    with browser_page(server) as page:
        page.check("#explain")
        page.set_input_files("#file", str(path))
        cards(page, 1)
        page.wait_for_function("(() => { const h = document.querySelector('.heatmap');"
                               " return h && h.complete && h.naturalWidth > 0; })()")
        frame = Image.open(io.BytesIO(page.locator(".frame").screenshot())).convert("RGB")
        heat = page.locator(".heatmap").bounding_box()
        box = page.locator(".frame").bounding_box()

    shown = np.asarray(frame.resize((30, 30)), dtype=int)
    assert np.abs(shown[:, [2, 15, 27]] - np.array(COLOURS["green"])).mean() < 30, "only the centre third is framed"
    assert (heat["width"], heat["height"]) == (box["width"], box["height"]) and heat["x"] > box["x"]


def decoded_data_url(url: str) -> Image.Image:
    import base64

    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_explain_adds_a_heat_map_png_per_image_to_the_same_answer(server: str, trained_run: Path) -> None:
    pytest.importorskip("pytorch_grad_cam")
    paths = val_images(trained_run)[:2]
    files = [(Path(p).name, Path(p).read_bytes()) for p in paths]
    plain = post(server, *files).json()["predictions"]
    explained = post(server, *files, explain=1).json()["predictions"]

    assert requests.get(f"{server}/model", timeout=10).json()["explain"] is True
    assert [a["top_k"] for a in explained] == [a["top_k"] for a in plain]
    assert all("heatmap" not in a for a in plain)
    for answer in explained:
        picture = decoded_data_url(answer["heatmap"])
        assert picture.format == "PNG" and picture.size == (64, 64)  # the run's input, as the model saw it


def test_heat_maps_of_a_request_larger_than_one_pass_stay_with_their_images(trained_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytorch_grad_cam")
    from transferkit.reporting.explain import heat_overlay, load_explainer
    from transferkit.commands.serve_app import EXPLAIN_BATCH_SIZE

    colours = ["blue", "red", "green", "red", "blue", "green"]
    paths = [make_image(tmp_path / f"{n}.jpg", COLOURS[c], seed=n) for n, c in enumerate(colours)]
    assert len(paths) > EXPLAIN_BATCH_SIZE
    with serving(create_app(trained_run, ServeLimits(max_files=len(paths)))) as url:
        answers = post(url, *((p.name, p.read_bytes()) for p in paths), explain=1).json()["predictions"]
    for path, answer in zip(paths, answers):
        (alone,) = load_explainer(trained_run).explain([str(path)])
        expected = heat_overlay(alone.image, alone.heatmap).astype(int)
        served = np.asarray(decoded_data_url(answer["heatmap"]).convert("RGB")).astype(int)
        assert np.abs(served - expected).mean() < 1, path.name  # the same map as the image's own, in order


def test_a_server_of_an_exported_model_says_heat_maps_need_the_run_folder(trained_run: Path) -> None:
    from transferkit.inference.loading import load_predictor

    image = val_images(trained_run)[0]
    with serving(create_app(load_predictor(trained_run), LIMITS)) as url:
        assert requests.get(f"{url}/model", timeout=10).json()["explain"] is False
        response = post(url, ("a.jpg", Path(image).read_bytes()), explain=1)
        assert post(url, ("a.jpg", Path(image).read_bytes())).status_code == 200
    assert response.status_code == 422
    assert "serve the run folder" in response.json()["detail"]


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_the_page_shows_the_heat_map_beside_the_bars_when_toggled(server: str, trained_run: Path) -> None:
    pytest.importorskip("pytorch_grad_cam")
    image = val_images(trained_run)[0]
    with browser_page(server) as page:
        page.wait_for_selector("#explain-toggle", state="visible")
        page.set_input_files("#file", image)
        cards(page, 1)
        hidden_before = page.locator(".heatmap").count() == 0
        page.check("#explain")  # asks again for the same image, with its heat map
        page.wait_for_function("(() => { const h = document.querySelector('.heatmap');"
                               " return h && h.complete && h.naturalWidth > 0; })()")
        heat = page.locator(".heatmap").bounding_box()
        bars = page.locator(".bars").bounding_box()
        labels = page.locator(".bars .label").all_inner_texts()

    assert hidden_before
    assert heat["width"] > 100 and heat["x"] + heat["width"] <= bars["x"]  # beside the bars, to their left
    assert labels == predict(trained_run, [image], top_k=2).predictions[0].labels


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_a_browser_with_a_camera_can_classify_a_photo_taken_on_the_page(server: str) -> None:
    # Chromium's fake camera (a test pattern), allowed without asking.
    with browser_page(server, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream") as page:
        page.wait_for_selector("#camera", state="visible")
        page.click("#camera")
        page.wait_for_function("document.getElementById('video').videoWidth > 0")
        page.click("#snap")
        (card,) = cards(page, 1)

    assert card["file"].startswith("camera-") and card["file"].endswith(".jpg")
    assert len(card["labels"]) == 2 and card["pictures"] == [True]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_chunked_upload_is_refused_as_its_bytes_arrive(server: str) -> None:
    """No Content-Length to check up front: the server must count the bytes, not spool them all."""
    port = int(server.rsplit(":", 1)[1])
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n")
    part = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'
    chunk = bytes(64 * 1024)
    offered, sent, answer = 64 * 2**20, 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        while sent < offered and not select.select([client], [], [], 0)[0]:
            try:
                client.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        if sent == offered:  # all of it taken in: end the upload so the answer can come
            end = b"\r\n--xx--\r\n"
            client.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
        with contextlib.suppress(ConnectionResetError):
            while data := client.recv(65536):
                answer += data

    # What is sent before the answer is the limit plus the two sockets' buffers, not the 64 MiB offered.
    assert sent < offered / 4, f"{sent:,} bytes taken in before the answer"
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"is over the limit of 3 files of 20,000 bytes" in answer
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


SERVE_OPTIONS = ["--top-k", "2", "--max-file-mb", "0.02", "--max-files", "3", "--max-pixels", "1000000",
                 "--max-queued", "4", "--max-connections", "250", "--header-timeout", "4", "--body-timeout", "3"]


@pytest.fixture(scope="module")
def process(trained_run: Path) -> Iterator[tuple[str, int]]:
    """`transferkit serve` in its own process, as a user starts it, so its memory can be read."""
    port = free_port()
    command = [sys.executable, "-m", "transferkit.cli", "serve", str(trained_run), "--port", str(port), *SERVE_OPTIONS]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


def resident_mib(pid: int, field: str = "VmRSS") -> float:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


CONCURRENT_CLIENTS = 24
MEMORY_BOUND_MIB = 100


def test_concurrent_clients_are_queued_or_told_to_retry_and_memory_stays_bounded(
    process: tuple[str, int], tmp_path: Path
) -> None:
    url, pid = process
    # 1000 x 1000 transparent PNGs: 4 KB each to send, 4 MB each to decode.
    sheer = png_bytes(Image.new("RGBA", (1000, 1000), (220, 40, 40, 128)))
    good = make_image(tmp_path / "good.jpg", COLOURS["red"], seed=1).read_bytes()
    post(url, ("good.jpg", good))  # the first request pays for lazy initialisation
    idle = resident_mib(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    start = threading.Barrier(CONCURRENT_CLIENTS)
    answers: list[requests.Response] = []

    def client(n: int) -> None:
        start.wait()
        answers.append(post(url, *[(f"{n}-{i}.png", sheer) for i in range(3)]))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CONCURRENT_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak = resident_mib(pid, "VmHWM")

    statuses = sorted(answer.status_code for answer in answers)
    assert len(answers) == CONCURRENT_CLIENTS and set(statuses) == {200, 503}, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert int(answer.headers["retry-after"]) >= 1 and "busy" in answer.json()["detail"]
        else:
            assert [p["filename"][-5:] for p in answer.json()["predictions"]] == ["0.png", "1.png", "2.png"]
    assert peak - idle < MEMORY_BOUND_MIB, f"{idle:.0f} MiB idle, {peak:.0f} MiB at the peak"
    assert post(url, ("good.jpg", good)).json()["predictions"][0]["top_k"][0]["label"] == "red"


def test_slow_clients_are_cut_off_and_health_answers_meanwhile(process: tuple[str, int]) -> None:
    url, _ = process
    port = int(url.rsplit(":", 1)[1])

    def connect(request: bytes) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(request)
        return client

    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        # Half a request line and headers, then nothing: the slow-loris pattern.
        slow = [stack.enter_context(connect(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")) for _ in range(200)]
        # Complete headers, then a trickle of the promised body.
        uploading = stack.enter_context(connect(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n--xx\r\n"))
        assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
        # Past --max-connections 250, a new connection is refused at once instead of held.
        extra = [stack.enter_context(connect(b"GET /health HTTP/1.1\r\n")) for _ in range(60)]
        time.sleep(0.5)
        refused = select.select(extra, [], [], 0)[0]
        assert time.monotonic() - started < 4, "the cap was checked after the header timeout"
        assert 0 < len(refused) < len(extra)
        for client in refused:
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(4096).startswith(b"HTTP/1.1 503"), "a refused connection is told why"

        assert uploading.recv(4096).startswith(b"HTTP/1.1 408")
        # --header-timeout 4: every half-sent request is closed by the server, not left to pile up.
        for client in slow:
            client.settimeout(max(0.1, started + 4 + 5 - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(4096) == b""
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}


def test_bad_serve_options_are_one_line_each_before_the_model_loads(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", str(trained_run), "--port", "99999", "--top-k", "0", "--max-files", "-1",
                 "--max-queued", "0", "--header-timeout", "0"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "error: --port must be between 1 and 65535, got 99999",
        "error: --top-k must be above 0, got 0",
        "error: --max-files must be above 0, got -1",
        "error: --max-queued must be above 0, got 0",
        "error: --header-timeout must be above 0, got 0",
    ]
    with pytest.raises(ConfigError) as raised:
        ServeLimits(max_pixels=0, body_timeout=-1)
    assert raised.value.problems == ["serve limit max_pixels must be above 0, got 0",
                                     "serve limit body_timeout must be above 0, got -1"]
