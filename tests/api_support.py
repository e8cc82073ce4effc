"""Shared by the HTTP API tests: a small indexed collection, the API under real uvicorn (on a
thread or in a subprocess), and a raw-socket HTTP client for requests httpx refuses to send."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx

from edje.synthetic import write_karpathy
from edje_client.api.server import ApiServer
from edje_client.api.settings import ApiSettings
from edje_client.cli import main as edje_main

QUERY = "a red circle left of a blue square"
TIMEOUT = httpx.Timeout(30.0, connect=5.0)


def indexed_collection(triton_server, root: Path, scenes: int = 12) -> Path:
    """``scenes`` synthetic images indexed with ``edje index`` (ids = file names, paths kept)."""
    dataset = write_karpathy(root / "data", "test", seed=0, max_scenes=scenes, captions_per_image=1)
    path = root / "collection"
    args = ["index", str(dataset.parent / "images"), "--collection", str(path)]
    assert edje_main([*args, "--url", triton_server.grpc_url]) == 0
    return path


def settings(triton_server, collection: Path, **overrides) -> ApiSettings:
    """API settings for the test server: gRPC to Triton, a free loopback port."""
    values = {"collection": str(collection), "url": triton_server.grpc_url, "port": 0}
    return ApiSettings(**{**values, **overrides})


@contextlib.contextmanager
def running_api(api_settings: ApiSettings, **kwargs) -> Iterator[ApiServer]:
    """The API under uvicorn on a background thread, stopped on exit."""
    server = ApiServer(api_settings, **kwargs).start(timeout=60)
    try:
        yield server
    finally:
        server.stop(timeout=15)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status (VmRSS, in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raw_request(port: int, data: bytes, timeout: float = 30.0) -> tuple[int, bytes, bytes]:
    """Send ``data`` as it is on a new connection; return (status, head, body). Status 0: the
    server closed the connection without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer (and close) mid-send
            sock.sendall(data)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    answer = b"".join(chunks)
    if not answer.startswith(b"HTTP/1.1 "):
        return 0, b"", answer
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


def http_bytes(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """An HTTP/1.1 request with ``Connection: close`` and a ``Content-Length`` (unless given
    other framing in ``headers``)."""
    fields = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    if "Transfer-Encoding" not in fields and "Content-Length" not in fields:
        fields["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n" + body
