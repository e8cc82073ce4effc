"""Settings of the HTTP API (``edje api``), checked once; importing this needs no FastAPI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

API_KEY_ENV = "EDJE_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_DOCUMENTS = 1000
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
DEFAULT_MAX_IMAGE_BYTES = 10 * 2**20


@dataclass(frozen=True)
class ApiSettings:
    """What one API process serves and the limits it enforces.

    Parameters
    ----------
    collection
        The collection (local directory or object-store URI) whose ids the API ranks, searches
        and adds to. A missing one is created by the first ``POST /v1/index``.
    url, protocol
        The Triton server (``host:port``; default: Triton's port for ``protocol``).
    api_key
        When set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``
        (default: the environment's ``EDJE_API_KEY``; an empty value means no key).
    max_documents
        Documents per re-rank, images per ``/v1/index`` request, and the largest ``k``.
    max_body_bytes
        Request bodies above this are refused with 413 (declared or streamed).
    max_image_bytes
        One decoded image above this is refused with 413.
    body_timeout
        Seconds a client has to send its whole body (then 408): a slow client holds only its
        own connection, never a worker.
    timeout, max_retries, concurrency
        The Triton client's per-request timeout, retries of retryable errors, and requests in
        flight per call.
    refresh_seconds
        How stale the API's view of the collection may get: rows committed by other writers
        (``edje index``) appear within this many seconds.
    """

    collection: str
    url: str | None = None
    protocol: str = "grpc"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = field(default=None, repr=False)
    max_documents: int = DEFAULT_MAX_DOCUMENTS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    body_timeout: float = 30.0
    timeout: float = 60.0
    max_retries: int = 1
    concurrency: int = 8
    refresh_seconds: float = 2.0
    storage_options: dict[str, str] | None = None
    model_name: str = "edje"

    def __post_init__(self) -> None:
        if not str(self.collection):
            raise ValueError("collection must name a directory or URI")
        object.__setattr__(self, "collection", str(self.collection))
        if self.protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {self.protocol!r}")
        for name in ("max_documents", "max_body_bytes", "max_image_bytes", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0..65535, got {self.port!r}")
        for name in ("body_timeout", "timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.api_key == "":
            object.__setattr__(self, "api_key", None)
        if self.api_key is not None and not self.api_key.isprintable():
            raise ValueError("the API key must be printable text")

    @staticmethod
    def key_from_environment() -> str | None:
        """``EDJE_API_KEY``, or ``None`` when unset or empty."""
        return os.environ.get(API_KEY_ENV) or None
