"""The web app of ``transferkit serve``: a page to drop images on and a REST API, bounded against hostile clients."""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations as objects,
# and FastAPI is imported inside the functions that use it so that it stays an optional dependency.
import asyncio
import contextlib
import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from importlib import resources
from typing import IO, Any

import numpy as np

from transferkit.commands.serve_limits import RETRY_AFTER_SECONDS, ServeLimits, bounded_receive
from transferkit.data.images import UnreadableImage, load_image, preprocess_image, resize_side
from transferkit.errors import ModelOutputError, TransferkitError
from transferkit.inference.loading import load_predictor
from transferkit.inference.predictor import Predictor
from transferkit.trust.records import UNKNOWN

log = logging.getLogger(__name__)


BATCH_SIZE = 16
"""images per forward pass: a larger request is classified in several, so the runtime's working
memory stays that of 16 images whatever ``max_files`` is"""


EXPLAIN_BATCH_SIZE = 4
"""images per heat-map pass: a backward pass keeps every activation, several times a forward's memory"""


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


class Classifier:
    """The model side of the app: decoding, batched inference, heat maps and answers. All of it
    runs on one thread: the runtime already spreads one forward pass over every core, so parallel
    requests would only multiply the decoded images and the runtime's working memory, which it
    keeps once grown."""

    def __init__(self, model: "str | os.PathLike[str] | Predictor", limits: ServeLimits, reject: bool):
        self.model = model
        self.predictor = model if isinstance(model, Predictor) else load_predictor(model)
        self.limits = limits
        self.reject = reject
        self.explain_refusal = _explain_refusal(model, self.predictor)
        self.explainer: Any = None  # the torch model, loaded by the first request that asks for heat maps
        unknown = self.predictor.unknown
        self.threshold = unknown["threshold"] if reject and unknown else None
        self.side = resize_side(self.predictor.preprocessing)
        self.release_memory = _memory_releaser()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="transferkit-predict")

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def describe(self) -> dict[str, Any]:
        predictor = self.predictor
        return {
            "classes": predictor.classes,
            "num_classes": len(predictor.classes),
            "architecture": predictor.info.get("architecture"),
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in predictor.preprocessing.items()},
            "calibration": predictor.info.get("calibration"),
            "unknown": {**predictor.unknown, "reject": self.reject} if predictor.unknown else None,
            "limits": asdict(self.limits),
            "explain": self.explain_refusal is None,
        }

    def preprocessed(self, name: str, file: IO[bytes]) -> np.ndarray:
        """One image as the model's input; the decoded picture is dropped as soon as it is resized."""
        from fastapi import HTTPException

        try:
            image = load_image(file, min_side=self.side, max_pixels=self.limits.max_pixels)
            return preprocess_image(image, self.predictor.preprocessing)
        except UnreadableImage as error:
            if error.too_large:
                raise HTTPException(413, f"{name}: {error}; send a smaller image") from None
            raise HTTPException(415, f"{name}: {error}") from None

    def classify(self, files: list[tuple[str, IO[bytes]]], explain: bool) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """Class probabilities, unknown scores (None without a score) and, with ``explain``, each
        image's heat map of its top class."""
        from fastapi import HTTPException

        try:
            inputs = [self.preprocessed(name, file) for name, file in files]
            try:
                outputs = [self.predictor.scored_batch(np.stack(inputs[i:i + BATCH_SIZE]))
                           for i in range(0, len(inputs), BATCH_SIZE)]
            except ModelOutputError as error:
                raise HTTPException(500, str(error)) from None
            probabilities = np.concatenate([batch for batch, _ in outputs])
            scores = None if outputs[0][1] is None else np.concatenate([scored for _, scored in outputs])
            return probabilities, scores, self.heatmaps(inputs, probabilities) if explain else []
        finally:
            self.release_memory()

    def heatmaps(self, inputs: list[np.ndarray], probabilities: np.ndarray) -> list[str]:
        if self.explainer is None:
            from transferkit.reporting.explain import load_explainer

            self.explainer = load_explainer(self.model)  # type: ignore[arg-type]
        return [url for i in range(0, len(inputs), EXPLAIN_BATCH_SIZE)
                for url in _heatmap_urls(self.explainer, inputs[i:i + EXPLAIN_BATCH_SIZE],
                                         probabilities[i:i + EXPLAIN_BATCH_SIZE])]

    def answers(self, names: list[str], probabilities: np.ndarray, scores: np.ndarray | None, k: int,
                heatmaps: list[str]) -> list[dict[str, Any]]:
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        found = []
        for n, (name, row, ranked) in enumerate(zip(names, probabilities, order)):
            score = None if scores is None else float(scores[n])
            unknown = self.threshold is not None and score is not None and score > self.threshold
            found.append({
                "filename": name,
                "answer": UNKNOWN if unknown else self.classes[ranked[0]],
                "unknown": unknown,
                **({"unknown_score": score} if score is not None else {}),
                "top_k": [{"label": self.classes[i], "probability": float(row[i])} for i in ranked],
                **({"heatmap": heatmaps[n]} if heatmaps else {}),
            })
        return found


class Admission:
    """At most ``max_queued`` prediction requests admitted at once; the next is told to retry."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.admitted = 0

    @contextlib.contextmanager
    def ticket(self) -> Iterator[None]:
        from fastapi import HTTPException

        if self.admitted >= self.limits.max_queued:
            raise HTTPException(503, f"busy: {self.limits.max_queued} requests are already waiting; "
                                     f"retry in {RETRY_AFTER_SECONDS} s",
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"})
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1


def checked_top_k(classifier: Classifier, top_k: int | None, explain: bool, declared_bytes: int) -> int:
    """The labels to return per image, once the request's own options and length are acceptable."""
    from fastapi import HTTPException

    limits, classes = classifier.limits, classifier.classes
    k = min(limits.top_k, len(classes)) if top_k is None else top_k
    if not 1 <= k <= len(classes):
        raise HTTPException(422, f"top_k must be between 1 and {len(classes)}, got {k}")
    if explain and classifier.explain_refusal is not None:
        raise HTTPException(422, classifier.explain_refusal)
    if declared_bytes > limits.max_request_bytes:
        raise HTTPException(413, f"request of {declared_bytes:,} bytes is over the limit of "
                                 f"{limits.max_files} files of {limits.max_file_bytes:,} bytes",
                            headers={"Connection": "close"})
    return k


async def classify_uploads(request: Any, classifier: Classifier, k: int, explain: bool) -> list[dict[str, Any]]:
    """Read the request's files within the limits and classify them on the worker thread."""
    from fastapi import HTTPException, Request

    limits = classifier.limits
    bounded = Request(request.scope, bounded_receive(request.receive, limits))
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
        found = await asyncio.get_running_loop().run_in_executor(classifier.worker, classifier.classify, files, explain)
    return classifier.answers(names, *found[:2], k, found[2])


def create_app(model: "str | os.PathLike[str] | Predictor", limits: ServeLimits | None = None, reject: bool = True) -> Any:
    """The FastAPI application for a run folder, an exported ``.onnx`` file or a Predictor. With
    ``reject``, an image the model scores above its unknown threshold is answered ``unknown``."""
    _require_fastapi()
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    classifier = Classifier(model, limits or ServeLimits(), reject)
    admission = Admission(classifier.limits)
    page = resources.files("transferkit").joinpath("static/serve.html").read_text(encoding="utf-8")
    app = FastAPI(title="transferkit", summary="image classification", version="1")

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
        return classifier.describe()

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None, explain: bool = False) -> dict[str, Any]:
        k = checked_top_k(classifier, top_k, explain, int(request.headers.get("content-length") or 0))
        with admission.ticket():
            return {"predictions": await classify_uploads(request, classifier, k, explain)}

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
