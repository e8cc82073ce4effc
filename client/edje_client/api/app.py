"""The FastAPI application of ``edje api``: :func:`create_app`.

Middlewares, outermost first: metrics (counts every answer, refusals included), the API key,
the body limit; then FastAPI's routing, with the handlers of :mod:`.errors`. The app opens its
:class:`~edje_client.api.state.AppState` (one Triton client, the collection) in its lifespan
and closes it after. Swagger and ReDoc pages are off: they load their assets from a CDN, and
the API must work offline; ``/openapi.json`` is the schema.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.staticfiles import StaticFiles

import edje_client
from edje_client.api import images, index, rerank, search, system
from edje_client.api.errors import install_handlers
from edje_client.api.metrics import MetricsMiddleware
from edje_client.api.security import ApiKeyMiddleware, BodyLimitMiddleware
from edje_client.api.settings import ApiSettings
from edje_client.api.state import AppState
from edje_client.client import EDJEClient


def create_app(
    settings: ApiSettings, client_factory: Callable[..., EDJEClient] = EDJEClient
) -> FastAPI:
    """The API for ``settings``. ``client_factory`` makes the Triton client (tests swap it)."""
    state = AppState(settings, client_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.edje = await run_in_threadpool(state.open)
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    app = FastAPI(
        title="EDJE re-ranking API",
        version=edje_client.__version__,
        description="Re-rank stored or inline images for a text query (Cohere / Jina "
        "compatible), search the collection, add images to it.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    modules = (rerank, search, index, images, system)
    for module in modules:
        app.include_router(module.router)
    if system.STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=system.STATIC_DIR), name="static")
    install_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout
    )
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    routes = [r for r in app.router.routes if hasattr(r, "path")]  # /openapi.json, /static
    routes += [route for module in modules for route in module.router.routes]
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, routes=routes)
    return app
