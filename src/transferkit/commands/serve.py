"""``transferkit serve``: the app on uvicorn, its port bound before anything is printed."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import Any

from transferkit.commands.serve_app import create_app
from transferkit.commands.serve_limits import RETRY_AFTER_SECONDS, ServeLimits
from transferkit.errors import ConfigError
from transferkit.inference.predictor import Predictor

log = logging.getLogger(__name__)


def guarded_protocol(limits: ServeLimits) -> type:
    """uvicorn's HTTP/1.1 protocol with a deadline for the request headers and a connection cap.

    uvicorn times out only idle keep-alive connections: one that sent part of a request, or
    nothing yet, is kept forever, and enough of them exhaust the process's file descriptors.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    refusal = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
               b"retry-after: %d\r\nconnection: close\r\ncontent-length: 21\r\n\r\ntoo many connections\n"
               % RETRY_AFTER_SECONDS)

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            if len(self.connections) > limits.max_connections:
                self.transport.write(refusal)
                self.transport.close()
                return
            self.arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_timer()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(limits.header_timeout, self.headers_overdue)

        def headers_overdue(self) -> None:
            # IDLE: no complete request line and headers yet; a request being answered is left alone.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closed a connection that sent no complete request in %g s", limits.header_timeout)
                self.transport.close()

    return GuardedH11Protocol


def server_options(limits: ServeLimits) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` or ``uvicorn.Config`` that hold the server to ``limits``."""
    return {
        "http": guarded_protocol(limits),
        "limit_concurrency": limits.max_connections,
        "timeout_keep_alive": limits.keep_alive_timeout,
    }


def serve(
    model: str | os.PathLike[str] | Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    reject: bool = True,
) -> None:
    """Serve ``model`` until interrupted (``reject``: see ``create_app``)."""
    limits = limits or ServeLimits()
    app = create_app(model, limits, reject)
    run_app(app, listen(host, port), limits)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for ``run_app``; when it cannot be, one line naming the option to change."""
    try:
        return _bind(host, port)
    except socket.gaierror as error:
        raise ConfigError([f"--host {host} is not an address this machine resolves ({error.strerror}); "
                           "use 127.0.0.1, or 0.0.0.0 for every interface"]) from None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            other = next((p for p in range(port + 1, min(port + 21, 65536)) if _is_free(host, p)), None)
            suggestion = f", such as --port {other}" if other else ""
            raise ConfigError([f"port {port} on {host} is taken by another program; "
                               f"choose another with --port{suggestion}"]) from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise ConfigError([f"--host {host} is not an address of this machine; "
                               "use 127.0.0.1, or 0.0.0.0 for every interface"]) from None
        raise ConfigError([f"cannot listen on {host} port {port} ({error.strerror}); "
                           "choose another with --port, such as --port 8000"]) from None


def _bind(host: str, port: int) -> socket.socket:
    # As uvicorn binds: IPv6 for an address with a colon, else IPv4; a restart reuses the port at once.
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    return listener


def _is_free(host: str, port: int) -> bool:
    try:
        _bind(host, port).close()
    except OSError:
        return False
    return True


def run_app(app: Any, listener: socket.socket, limits: ServeLimits) -> None:
    """Serve an app of ``create_app`` on ``listen``'s socket until interrupted, held to ``limits``."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **server_options(limits)))
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped, as under uvicorn.run
        pass
    finally:
        listener.close()
    if not server.started:  # uvicorn has logged why, as uvicorn.run exits then
        raise SystemExit(3)
