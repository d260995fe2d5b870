"""A real `transferkit serve` process for the benchmarks that measure one."""

from __future__ import annotations

import subprocess
import time

import requests


def wait_until_serving(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once ``url/health`` answers; raise with the server's stderr if it dies or never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"the server did not start: {server.stderr.read().decode() if server.stderr else ''}")
        time.sleep(0.2)
