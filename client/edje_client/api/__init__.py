"""The HTTP API in front of Triton (``edje api``): Cohere / Jina re-ranking, search, indexing.

Importing this package needs nothing beyond ``edje_client``; :func:`create_app` and
:class:`~edje_client.api.server.ApiServer` need the ``api`` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

from typing import Any

from edje_client.api.settings import ApiSettings

__all__ = ["ApiSettings", "create_app"]


def create_app(settings: ApiSettings, **kwargs: Any) -> Any:
    """The FastAPI app (see :func:`edje_client.api.app.create_app`)."""
    from edje_client.api.app import create_app as _create_app

    return _create_app(settings, **kwargs)
