"""A small web service for a trained classifier: a page to drop an image on, and a REST API.

    GET  /          the page
    GET  /health    {"status": "ok"}
    GET  /model     classes, architecture, preprocessing and the limits below
    POST /predict   multipart/form-data with one or more image files -> top-k labels per file

Everything a client can send is checked before it costs memory or time: the request size, the
number of files, each file's size, and each image's pixel count (read from its header, before
decoding, so a decompression bomb is refused, not decoded). Each refusal is a 4xx answer naming
the file; an unexpected failure is a 500 answer, and the server keeps serving.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations as objects,
# and ``Request`` is imported inside create_app so that FastAPI stays an optional dependency.
import io
import logging
import os
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np

from transferkit.data import UnreadableImage, load_image
from transferkit.errors import TransferkitError
from transferkit.inference import Classifier, load_classifier

log = logging.getLogger(__name__)


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


def create_app(model: str | os.PathLike[str] | Classifier, limits: ServeLimits | None = None) -> Any:
    """The FastAPI application for a run folder, an exported ``.onnx`` file or a Classifier."""
    _require_fastapi()
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse

    classifier = model if isinstance(model, Classifier) else load_classifier(model)
    limits = limits or ServeLimits()
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
        return {
            "classes": classifier.classes,
            "num_classes": len(classifier.classes),
            "architecture": classifier.info.get("architecture"),
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in classifier.preprocessing.items()},
            "limits": asdict(limits),
        }

    def decode(name: str, data: bytes) -> Any:
        try:
            return load_image(io.BytesIO(data), max_pixels=limits.max_pixels)
        except UnreadableImage as error:
            if error.too_large:
                raise HTTPException(413, f"{name}: {error}; send a smaller image") from None
            raise HTTPException(415, f"{name}: {error}") from None

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None) -> dict[str, Any]:
        k = min(limits.top_k, len(classifier.classes)) if top_k is None else top_k
        if not 1 <= k <= len(classifier.classes):
            raise HTTPException(422, f"top_k must be between 1 and {len(classifier.classes)}, got {k}")
        declared = int(request.headers.get("content-length") or 0)
        # Multipart framing adds a few hundred bytes per file to the files themselves.
        if declared > limits.max_files * (limits.max_file_bytes + 4096):
            raise HTTPException(413, f"request of {declared:,} bytes is over the limit of "
                                     f"{limits.max_files} files of {limits.max_file_bytes:,} bytes")
        form = await request.form(max_files=limits.max_files, max_fields=100)
        uploads = [value for _, value in form.multi_items() if not isinstance(value, str)]
        if not uploads:
            raise HTTPException(
                400, "no image in the request; send files as multipart/form-data, e.g. curl -F file=@photo.jpg"
            )
        images, names = [], []
        for upload in uploads:
            name = upload.filename or "upload"
            data = await upload.read(limits.max_file_bytes + 1)
            if len(data) > limits.max_file_bytes:
                raise HTTPException(413, f"{name} is over the {limits.max_file_bytes:,}-byte limit")
            images.append(await run_in_threadpool(decode, name, data))
            names.append(name)
        probabilities = await run_in_threadpool(classifier.probabilities_of_images, images)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return {
            "predictions": [
                {
                    "filename": name,
                    "top_k": [{"label": classifier.classes[i], "probability": float(row[i])} for i in ranked],
                }
                for name, row, ranked in zip(names, probabilities, order)
            ]
        }

    return app


def serve(
    model: str | os.PathLike[str] | Classifier,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
) -> None:
    """Serve ``model`` until interrupted."""
    app = create_app(model, limits)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
