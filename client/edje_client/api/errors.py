"""How failures become HTTP answers: always JSON ``{"detail": "..."}`` naming the problem.

================================================  ======  =========================================
failure                                           status  notes
================================================  ======  =========================================
malformed JSON, an unparsable body                400
a field missing or of the wrong type, ``top_n``   422     ``errors`` lists each field's problem
<= 0, empty ``documents``
an unknown id, a bad image, invalid base64        400     names the document (``documents[3]``)
more documents than ``--max-documents``, a body   413
or an image over its limit
no or a wrong ``Authorization: Bearer`` key       401     every route but ``/health`` and the page
an id stored meanwhile by another writer          409
body not sent within ``--body-timeout``           408
Triton shed the request (``UNAVAILABLE``, 503)    429     ``Retry-After: 1``
Triton unreachable, or a model not ready          503     ``Retry-After: 1``
Triton did not answer in time                     504
any other server failure                          502
================================================  ======  =========================================

No traceback ever reaches a client; unexpected errors are logged and answered with 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from edje_client.collection_format import (
    CollectionError,
    CollectionMismatchError,
    DuplicateIdError,
)
from edje_client.errors import (
    APIConnectionError,
    APITimeoutError,
    EDJEError,
    InvalidInputError,
    ModelNotReadyError,
    ServerError,
)

log = logging.getLogger("edje.api")

RETRY_AFTER = {"Retry-After": "1"}
SHOWN_FIELD_ERRORS = 5


class ApiError(Exception):
    """A request the API refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def error_response(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any):
    """The JSON error answer every route and middleware gives."""
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def from_edje_error(err: EDJEError) -> ApiError:
    """The HTTP answer for an error of ``edje_client`` (see the module's table)."""
    if isinstance(err, InvalidInputError):
        return ApiError(400, f"the model server refused the input: {err.message}")
    if isinstance(err, APITimeoutError):
        return ApiError(504, "the model server did not answer in time")
    if isinstance(err, APIConnectionError):
        return ApiError(503, "the model server is unreachable; retry later", RETRY_AFTER)
    if isinstance(err, ModelNotReadyError):
        return ApiError(503, f"a model is not ready: {err.message}", RETRY_AFTER)
    if isinstance(err, ServerError) and err.retryable:
        return ApiError(429, "the model server is overloaded (request shed); retry", RETRY_AFTER)
    if isinstance(err, DuplicateIdError):  # another writer stored the same id meanwhile
        return ApiError(409, "an id of this request was stored meanwhile by another writer")
    if isinstance(err, CollectionMismatchError):
        return ApiError(503, f"the collection does not fit the served model: {err.message}")
    if isinstance(err, CollectionError):
        log.error("collection error: %s", err.message)
        return ApiError(500, "the collection could not be read or written")
    log.error("model server error: %s", err.message)
    return ApiError(502, "the model server failed the request")


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors without the (possibly huge) input values."""
    return [
        {
            "loc": [str(part) for part in e.get("loc", ())],
            "msg": e.get("msg", ""),
            "type": e["type"],
        }
        for e in exc.errors()
    ]


def install_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the module's JSON answers."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.detail, exc.headers)

    @app.exception_handler(EDJEError)
    async def edje_error(_: Request, exc: EDJEError) -> JSONResponse:
        answer = from_edje_error(exc)
        return error_response(answer.status, answer.detail, answer.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, "the body is not valid JSON")
        shown = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:SHOWN_FIELD_ERRORS])
        more = len(errors) - SHOWN_FIELD_ERRORS
        detail = shown + (f" (and {more} more)" if more > 0 else "")
        return error_response(422, detail or "invalid request", errors=errors[:50])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error")
