"""The one exception hierarchy of ``edje_client``; tritonclient and network errors mapped to it.

::

    EDJEError
    ├── APIConnectionError        server unreachable (retryable)
    │   └── APITimeoutError       no answer in time (retryable)
    ├── InvalidInputError         HTTP 400 / INVALID_ARGUMENT, or rejected before sending
    ├── ModelNotReadyError        a model is missing or not ready
    ├── ServerError               5xx / INTERNAL / UNAVAILABLE ... (retryable for 502/503/504
    │                             and UNAVAILABLE)
    ├── LaunchError               the embedded tritonserver could not start, or exited
    │                             (edje_client.server)
    └── CollectionError           a collection cannot be opened, read or written
        │                         (edje_client.collection_format)
        ├── CollectionNotFoundError   no collection at the URI (also a FileNotFoundError)
        ├── CollectionMismatchError   another model's or shape's collection
        └── DuplicateIdError          an id stored twice (also a ValueError)

Every failure of the server, the network, a collection or the embedded server is an
:class:`EDJEError`; a bad constructor argument (a URL with a scheme, say) is a ``ValueError``.
"""

from __future__ import annotations

import asyncio
import sys

from tritonclient.utils import InferenceServerException

INVALID_STATUSES = frozenset(
    {"400", "413", "422", "StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE"}
)
NOT_FOUND_STATUSES = frozenset({"404", "StatusCode.NOT_FOUND"})
TIMEOUT_STATUSES = frozenset({"408", "StatusCode.DEADLINE_EXCEEDED"})
RETRYABLE_STATUSES = frozenset({"502", "503", "504", "StatusCode.UNAVAILABLE"})


class EDJEError(Exception):
    """Base class of every error the EDJE client raises.

    Parameters
    ----------
    message
        What went wrong; for errors from the server, the server's own message.
    status
        The HTTP status (``"400"``) or gRPC code (``"StatusCode.INVALID_ARGUMENT"``), if any.
    """

    retryable: bool = False

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class APIConnectionError(EDJEError):
    """The server could not be reached (refused, reset, DNS ...)."""

    retryable = True


class APITimeoutError(APIConnectionError):
    """The server did not answer within the client's timeout."""


class InvalidInputError(EDJEError):
    """The request was rejected as malformed, by the server or by the client's own checks."""


class ModelNotReadyError(EDJEError):
    """A model the client needs is unknown to the server or not ready."""


class ServerError(EDJEError):
    """The server failed to handle a valid request (5xx, INTERNAL, UNAVAILABLE ...)."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message, status)
        self.retryable = status in RETRYABLE_STATUSES


class LaunchError(EDJEError):
    """The embedded ``tritonserver`` could not start, or exited on its own (with its log)."""


def _from_triton(exc: InferenceServerException) -> EDJEError:
    status = exc.status()
    status = None if status is None else str(status)
    message = exc.message() or str(exc)
    if status in INVALID_STATUSES:
        return InvalidInputError(message, status)
    if status in NOT_FOUND_STATUSES:
        return ModelNotReadyError(message, status)
    if status in TIMEOUT_STATUSES:
        return APITimeoutError(message, status)
    lowered = message.lower()
    if status == "StatusCode.UNAVAILABLE" and ("connect" in lowered or "socket" in lowered):
        return APIConnectionError(message, status)
    if status is None or status.startswith("4"):
        return EDJEError(message, status)
    return ServerError(message, status)


def as_edje_error(exc: BaseException) -> EDJEError | None:
    """The :class:`EDJEError` that stands for ``exc``, or ``None`` when it is not a known kind.

    Handles :class:`EDJEError` itself (returned unchanged), tritonclient's
    ``InferenceServerException`` from both the HTTP and the gRPC clients (classified by
    ``.status()``, keeping ``.message()``), timeouts, ``OSError`` and aiohttp's errors.
    """
    if isinstance(exc, EDJEError):
        return exc
    if isinstance(exc, InferenceServerException):
        return _from_triton(exc)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return APITimeoutError(f"request timed out: {exc}" if str(exc) else "request timed out")
    aiohttp = sys.modules.get("aiohttp")
    if isinstance(exc, OSError) or (aiohttp is not None and isinstance(exc, aiohttp.ClientError)):
        return APIConnectionError(str(exc) or type(exc).__name__)
    return None
