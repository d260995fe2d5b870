"""The web app of ``transferkit serve``: a page to drop images on and a REST API, bounded against hostile clients."""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations as objects,
# and ``Request`` is imported inside create_app so that FastAPI stays an optional dependency.
import asyncio
import ctypes
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from importlib import resources
from typing import IO, Any

import numpy as np

from transferkit.data.images import UnreadableImage, load_image, preprocess_image, resize_side
from transferkit.errors import ConfigError, ModelOutputError, TransferkitError
from transferkit.inference.loading import load_predictor
from transferkit.inference.predictor import Predictor
from transferkit.trust.records import UNKNOWN

log = logging.getLogger(__name__)


BATCH_SIZE = 16
"""images per forward pass: a larger request is classified in several, so the runtime's working
memory stays that of 16 images whatever ``max_files`` is"""


EXPLAIN_BATCH_SIZE = 4
"""images per heat-map pass: a backward pass keeps every activation, several times a forward's memory"""


RETRY_AFTER_SECONDS = 1


# Multipart framing adds a few hundred bytes per file to the files themselves.
FRAMING_BYTES_PER_FILE = 4096


@dataclass
class ServeLimits:
    top_k: int = 5
    """labels returned per image unless the request asks for another number (?top_k=N)"""
    max_file_bytes: int = 10 * 1024 * 1024
    """largest accepted file"""
    max_files: int = 16
    """most files in one request"""
    max_pixels: int = 40_000_000
    """most pixels in one image (width x height, read from the header before decoding)"""
    max_queued: int = 8
    """most prediction requests admitted at once (uploading, waiting or being classified); more
    are answered 503 with a Retry-After header"""
    max_connections: int = 512
    """most open connections (uvicorn's limit_concurrency): requests beyond it are answered 503
    and further connections are closed at once, so file descriptors cannot run out"""
    header_timeout: float = 10.0
    """seconds a connection has to send its request line and headers before it is closed"""
    body_timeout: float = 60.0
    """seconds a prediction request has to upload its files before it is answered 408"""
    keep_alive_timeout: float = 5.0
    """seconds an idle keep-alive connection stays open"""

    def __post_init__(self) -> None:
        problems = [f"serve limit {field.name} must be above 0, got {getattr(self, field.name)}"
                    for field in fields(self) if not getattr(self, field.name) > 0]
        if problems:
            raise ConfigError(problems)

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * (self.max_file_bytes + FRAMING_BYTES_PER_FILE)


def _memory_releaser() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, or nothing where the C library is another.

    glibc keeps what a worker thread frees in that thread's arena for reuse: after one 40-megapixel
    PNG the server stayed 600 MB larger, idle, for good (measured). Trimming after each request
    hands it back to the system.
    """
    try:
        return functools.partial(ctypes.CDLL("libc.so.6").malloc_trim, 0)
    except (OSError, AttributeError):
        return lambda: None


def _require_fastapi() -> None:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise TransferkitError(
            f"serving needs FastAPI, uvicorn and python-multipart ({error.name} is missing); "
            "install them with: pip install 'transferkit[serve]'"
        ) from None


Receive = Callable[[], Awaitable[dict[str, Any]]]


def _bounded_receive(receive: Receive, limits: ServeLimits) -> Receive:
    """``receive`` that refuses a body once it passes the request limit or the upload deadline.

    The bytes are counted as they arrive, so a chunked upload, which declares no length, is
    refused as early as one that declares too much, before the form parser spools it to disk.
    """
    from fastapi import HTTPException

    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout
    received = 0
    # The refused body is left unread: closing the connection stops the client sending it.
    close = {"Connection": "close"}

    async def bounded() -> dict[str, Any]:
        nonlocal received
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the upload took over {limits.body_timeout:g} s; send it again",
                                headers=close) from None
        received += len(message.get("body", b""))
        if received > limits.max_request_bytes:
            raise HTTPException(413, f"request of over {limits.max_request_bytes:,} bytes is over the limit of "
                                     f"{limits.max_files} files of {limits.max_file_bytes:,} bytes", headers=close)
        return message

    return bounded


def create_app(model: str | os.PathLike[str] | Predictor, limits: ServeLimits | None = None, reject: bool = True) -> Any:
    """The FastAPI application for a run folder, an exported ``.onnx`` file or a Predictor. With
    ``reject``, an image the model scores above its unknown threshold is answered ``unknown``."""
    _require_fastapi()
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    explain_refusal = _explain_refusal(model, predictor)
    explainers: list[Any] = []  # the torch model, loaded by the first request that asks for heat maps
    limits = limits or ServeLimits()
    page = resources.files("transferkit").joinpath("static/serve.html").read_text(encoding="utf-8")
    app = FastAPI(title="transferkit", summary="image classification", version="1")
    # One thread does all decoding and inference: the runtime already spreads one forward pass
    # over every core, so parallel requests would only multiply the decoded images and the
    # runtime's working memory, which it keeps once grown.
    worker = ThreadPoolExecutor(1, thread_name_prefix="transferkit-predict")
    admitted = 0
    side = resize_side(predictor.preprocessing)
    release_memory = _memory_releaser()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("failed on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(error).__name__}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def describe() -> dict[str, Any]:
        return {
            "classes": predictor.classes,
            "num_classes": len(predictor.classes),
            "architecture": predictor.info.get("architecture"),
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in predictor.preprocessing.items()},
            "calibration": predictor.info.get("calibration"),
            "unknown": {**predictor.unknown, "reject": reject} if predictor.unknown else None,
            "limits": asdict(limits),
            "explain": explain_refusal is None,
        }

    def preprocessed(name: str, file: IO[bytes]) -> np.ndarray:
        """One image as the model's input; the decoded picture is dropped as soon as it is resized."""
        try:
            return preprocess_image(load_image(file, min_side=side, max_pixels=limits.max_pixels),
                                    predictor.preprocessing)
        except UnreadableImage as error:
            if error.too_large:
                raise HTTPException(413, f"{name}: {error}; send a smaller image") from None
            raise HTTPException(415, f"{name}: {error}") from None

    def classify(
        files: list[tuple[str, IO[bytes]]], explain: bool
    ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """Class probabilities, unknown scores (None without a score) and, with ``explain``, each
        image's heat map of its top class."""
        try:
            inputs = [preprocessed(name, file) for name, file in files]
            try:
                outputs = [predictor.scored_batch(np.stack(inputs[i:i + BATCH_SIZE]))
                           for i in range(0, len(inputs), BATCH_SIZE)]
            except ModelOutputError as error:
                raise HTTPException(500, str(error)) from None
            probabilities = np.concatenate([batch for batch, _ in outputs])
            scores = None if outputs[0][1] is None else np.concatenate([scored for _, scored in outputs])
            if not explain:
                return probabilities, scores, []
            if not explainers:
                from transferkit.reporting.explain import load_explainer

                explainers.append(load_explainer(model))  # type: ignore[arg-type]
            return probabilities, scores, [
                url for i in range(0, len(inputs), EXPLAIN_BATCH_SIZE)
                for url in _heatmap_urls(explainers[0], inputs[i:i + EXPLAIN_BATCH_SIZE],
                                         probabilities[i:i + EXPLAIN_BATCH_SIZE])
            ]
        finally:
            release_memory()

    threshold = predictor.unknown["threshold"] if reject and predictor.unknown else None

    def answer(name: str, probabilities: np.ndarray, score: float | None, ranked: np.ndarray) -> dict[str, Any]:
        unknown = threshold is not None and score is not None and score > threshold
        return {
            "filename": name,
            "answer": UNKNOWN if unknown else predictor.classes[ranked[0]],
            "unknown": unknown,
            **({"unknown_score": score} if score is not None else {}),
            "top_k": [{"label": predictor.classes[i], "probability": float(probabilities[i])} for i in ranked],
        }

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None, explain: bool = False) -> dict[str, Any]:
        nonlocal admitted
        k = min(limits.top_k, len(predictor.classes)) if top_k is None else top_k
        if not 1 <= k <= len(predictor.classes):
            raise HTTPException(422, f"top_k must be between 1 and {len(predictor.classes)}, got {k}")
        if explain and explain_refusal is not None:
            raise HTTPException(422, explain_refusal)
        declared = int(request.headers.get("content-length") or 0)
        if declared > limits.max_request_bytes:
            raise HTTPException(413, f"request of {declared:,} bytes is over the limit of "
                                     f"{limits.max_files} files of {limits.max_file_bytes:,} bytes",
                                headers={"Connection": "close"})
        if admitted >= limits.max_queued:
            raise HTTPException(503, f"busy: {limits.max_queued} requests are already waiting; "
                                     f"retry in {RETRY_AFTER_SECONDS} s",
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"})
        admitted += 1
        try:
            bounded = Request(request.scope, _bounded_receive(request.receive, limits))
            async with bounded.form(max_files=limits.max_files, max_fields=100) as form:
                uploads = [value for _, value in form.multi_items() if not isinstance(value, str)]
                if not uploads:
                    raise HTTPException(
                        400, "no image in the request; send files as multipart/form-data, e.g. curl -F file=@photo.jpg"
                    )
                names = [upload.filename or "upload" for upload in uploads]
                for name, upload in zip(names, uploads):
                    if (upload.size or 0) > limits.max_file_bytes:
                        raise HTTPException(413, f"{name} is over the {limits.max_file_bytes:,}-byte limit")
                files = [(name, upload.file) for name, upload in zip(names, uploads)]
                probabilities, scores, heatmaps = await asyncio.get_running_loop().run_in_executor(
                    worker, classify, files, explain)
        finally:
            admitted -= 1
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        answers = [
            answer(name, row, None if scores is None else float(scores[n]), ranked)
            for n, (name, row, ranked) in enumerate(zip(names, probabilities, order))
        ]
        for found, heatmap in zip(answers, heatmaps):
            found["heatmap"] = heatmap
        return {"predictions": answers}

    return app


def _explain_refusal(model: Any, predictor: Predictor) -> str | None:
    """Why this server cannot draw heat maps, or None when it can. Asked once, at start: a
    backbone without a map to hook is refused with a 422, not a 500 after a model load per request."""
    from transferkit.reporting.explain import ExplainUnavailable, grad_cam_available, target_layer
    from transferkit.run.folder import is_exported_file

    if isinstance(model, Predictor) or is_exported_file(model):
        return "heat maps need the torch model: serve the run folder instead of an exported file"
    if not grad_cam_available():
        return "heat maps need the grad-cam package: pip install 'transferkit[explain]' where the server runs"
    backbone = getattr(predictor.module, "model", None)  # the classifier inside the ScoredClassifier
    if backbone is not None:
        try:
            target_layer(backbone, tuple(predictor.preprocessing["input_size"]))
        except ExplainUnavailable as error:
            return str(error)
    return None


def _heatmap_urls(explainer: Any, inputs: list[np.ndarray], probabilities: np.ndarray) -> list[str]:
    """PNG data URLs of the heat maps of the top classes over the images the model saw."""
    import base64
    import io

    from PIL import Image

    from transferkit.reporting.explain import heat_overlay

    top = probabilities.argmax(axis=1)
    heatmaps, _ = explainer.maps(np.stack(inputs), targets=list(top))
    urls = []
    for image, heatmap in zip(inputs, heatmaps):
        buffer = io.BytesIO()
        Image.fromarray(heat_overlay(explainer.seen_image(image), heatmap)).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return urls
