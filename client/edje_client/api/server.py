"""Running the API under uvicorn: in the foreground (``edje api``), on a background thread
(:class:`ApiServer`), or as a subprocess (:func:`api_process`).

uvicorn's settings here: keep-alive connections idle for 5 s are closed; headers are capped at
uvicorn's 16 kB (a larger head is a 400); the body limit and the body timeout are the app's own
(:mod:`.security`), since uvicorn has neither. No server header, no proxy headers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from edje_client.api.settings import ApiSettings

KEEP_ALIVE_SECONDS = 5
GRACEFUL_SECONDS = 10


def uvicorn_config(settings: ApiSettings, app: Any = None, log_level: str = "info") -> Any:
    """The ``uvicorn.Config`` serving ``app`` (default: ``create_app(settings)``)."""
    import uvicorn

    from edje_client.api.app import create_app

    return uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )


def serve(settings: ApiSettings, log_level: str = "info") -> None:
    """Serve in the foreground until SIGINT or SIGTERM."""
    import uvicorn

    uvicorn.Server(uvicorn_config(settings, log_level=log_level)).run()


class ApiServer:
    """The API on a background thread, on ``settings.port`` (0: a free port), for tests,
    benchmarks and notebooks. A context manager; :attr:`url` is ``http://host:port``."""

    def __init__(self, settings: ApiSettings, app: Any = None, log_level: str = "warning"):
        import uvicorn

        self.settings = settings
        self._server = uvicorn.Server(uvicorn_config(settings, app, log_level))
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = settings.port

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ApiServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.port))
        self._socket, self.port = sock, sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="edje-api", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the API did not start (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the API did not start within {timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def api_process(
    collection: str | os.PathLike[str],
    triton_url: str,
    *extra: str,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """``edje api`` in a subprocess on a free loopback port, healthy; terminated on exit.

    Yields the process with ``url`` (``http://127.0.0.1:PORT``) set on it. ``extra`` are
    further ``edje api`` arguments.
    """
    import httpx

    from edje_client.server import find_free_port

    port = find_free_port()
    command = [sys.executable, "-m", "edje_client.cli", "api", "--collection", str(collection)]
    command += ["--url", triton_url, "--port", str(port), "--log-level", "warning", *extra]
    process = subprocess.Popen(command, env={**os.environ, **(env or {})})
    process.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"edje api exited with code {process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(process.url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"edje api was not healthy within {timeout:g} s")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
