"""What a ``transferkit serve`` request may be: the limits' dataclass, and a body reader that
enforces them as bytes arrive."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any

from transferkit.errors import ConfigError

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


Receive = Callable[[], Awaitable[dict[str, Any]]]


def bounded_receive(receive: Receive, limits: ServeLimits) -> Receive:
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
