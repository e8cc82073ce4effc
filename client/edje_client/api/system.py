"""``GET /health``, ``GET /metrics``, and the search page at ``/`` (static files if present)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from edje_client.api.state import AppState

router = APIRouter()

STATIC_DIR = Path(__file__).parent / "static"
PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EDJE search</title></head>
<body><h1>EDJE search</h1>
<p>The search page is not installed. The API is here: <code>POST /v1/search</code>,
<code>POST /v2/rerank</code>; its schema is <a href="/openapi.json">/openapi.json</a>.</p>
</body></html>
"""


def get_state(request: Request) -> AppState:
    """The app's :class:`AppState` (a FastAPI dependency)."""
    return request.app.state.edje


State = Annotated[AppState, Depends(get_state)]


@router.get("/health", tags=["system"], summary="Triton readiness and the collection's state")
def health(request: Request) -> JSONResponse:
    state = get_state(request)
    triton = state.link.probe()
    connected = False
    if triton["ready"]:
        try:
            state.link.client()
            connected = True
        except Exception as exc:  # noqa: BLE001 - reported, not raised: this is the probe
            triton["error"] = type(exc).__name__
    with state.collection.locked() as collection:
        rows, version = len(collection), collection.version
    ok = triton["ready"] and connected
    body = {
        "status": "ok" if ok else "unavailable",
        "triton": {"protocol": state.settings.protocol, **triton},
        "collection": {"name": state.collection_name, "rows": rows, "version": version},
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", tags=["system"], summary="Prometheus metrics")
def metrics(request: Request) -> Response:
    registry = get_state(request).metrics
    return Response(registry.render(), media_type=registry.content_type)


@router.get("/", include_in_schema=False)
def page() -> Response:
    index = STATIC_DIR / "index.html"
    if index.is_file():
        return FileResponse(index, media_type="text/html")
    return HTMLResponse(PLACEHOLDER)
