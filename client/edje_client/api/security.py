"""Two ASGI middlewares in front of every route: the API key and the body limit.

Both answer before any route runs, with the API's JSON errors:

* **API key.** With a key set, every route but ``/health`` needs ``Authorization: Bearer
  <key>``; anything else is 401. The search page (``/`` and its ``/static/`` files) is public
  too: it holds no data, and a browser cannot send the header to load it; the page asks for
  the key and sends it with its API calls. The comparison is constant-time over SHA-256
  digests, so neither the key nor its length leaks through timing.
* **Body limit.** A ``Content-Length`` above ``max_body_bytes`` is refused (413) before a byte
  of the body is read; a body without one (chunked) is counted as it streams and refused the
  moment it passes the limit. The whole body must arrive within ``body_timeout`` seconds
  (else 408), so a client that trickles its body holds only its own connection: the server is
  asyncio and runs the routes on a thread pool only once the body is in. The body is handed to
  the route from memory, at most ``max_body_bytes`` per request in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edje_client.api.errors import error_response

PUBLIC_PATHS = frozenset({"/health", "/"})
PUBLIC_PREFIX = "/static/"
DRAIN_BYTES = 64 * 2**20  # read and dropped at most, so a refused client sees its 413
DRAIN_IDLE_SECONDS = 0.5  # a client that stopped sending gets its 413 after this


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ApiKeyMiddleware:
    """401 for a missing or wrong bearer key on every route but :data:`PUBLIC_PATHS`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = _digest(api_key.encode("utf-8"))

    def authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").strip().partition(" ")
        given = _digest(token.strip().encode("latin-1"))  # the header's own bytes back
        # Compare digests whatever the scheme, so a wrong scheme costs the same time.
        return hmac.compare_digest(given, self._expected) and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX):
            await self.app(scope, receive, send)
            return
        if not self.authorized(Headers(scope=scope)):
            detail = "missing or invalid API key: send Authorization: Bearer <key>"
            response = error_response(401, detail, {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes`` (declared or streamed); 408 when it is too slow."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, drain: bool) -> None:
        """413, after reading and discarding what the client is still sending (up to
        :data:`DRAIN_BYTES`, for at most the body timeout), so that it sees the answer."""
        if drain:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_discard(receive), min(self.timeout, 10.0))
        detail = f"the request body exceeds the limit of {self.max_bytes} bytes"
        await error_response(413, detail, {"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and "transfer-encoding" in headers:  # a smuggling attempt
            detail = "send Content-Length or Transfer-Encoding, not both"
            await error_response(400, detail, {"Connection": "close"})(scope, receive, send)
            return
        if declared is not None:
            if not declared.strip().isdigit():
                await error_response(400, "invalid Content-Length")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                # A client waiting for "100 Continue" has sent nothing: no need to drain.
                waits = headers.get("expect", "").lower() == "100-continue"
                drain = not waits and int(declared) <= DRAIN_BYTES
                await self._refuse(scope, receive, send, drain)
                return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:  # (TimeoutError from Python 3.11 on)
            detail = f"the request body did not arrive within {self.timeout:g} s"
            await error_response(408, detail, {"Connection": "close"})(scope, receive, send)
            return
        if body is None:  # the client went away
            return
        if len(body) > self.max_bytes:
            await self._refuse(scope, receive, send, drain=True)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or as soon as it passes the limit (then longer than the limit)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            if size > self.max_bytes or not message.get("more_body", False):
                return b"".join(chunks)


async def _discard(receive: Receive) -> None:
    """Read and drop the rest of a body: up to :data:`DRAIN_BYTES`, while it keeps coming."""
    size = 0
    while size <= DRAIN_BYTES:
        message = await asyncio.wait_for(receive(), DRAIN_IDLE_SECONDS)
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        size += len(message.get("body", b""))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then waits for the client's disconnect."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
