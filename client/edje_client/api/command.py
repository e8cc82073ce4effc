"""``edje api``: its arguments and its command (FastAPI and uvicorn are imported only to run)."""

from __future__ import annotations

import argparse

from edje_client.api.settings import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_DOCUMENTS,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_PORT,
    ApiSettings,
)
from edje_client.collection_cli import UsageError, storage_options

SUMMARY = "serve the HTTP API (Cohere/Jina re-rank, search, index) in front of Triton"
DESCRIPTION = (
    "Serve re-ranking (POST /v2/rerank, /v1/rerank, /rerank), search (POST /v1/search), "
    "indexing (POST /v1/index), stored images (GET /v1/images/{id}), /health, /metrics and "
    "/openapi.json over HTTP, in front of a Triton server and one collection."
)
EXAMPLES = f"""\
examples:
  edje api --collection my-photos/                      on 127.0.0.1:8080, Triton at :8001
  {API_KEY_ENV}=secret edje api --collection my-photos/ --port 9000
  edje api --collection my-photos/ --url triton:8001 --host 0.0.0.0 --max-documents 256

With a key (--api-key or {API_KEY_ENV}; prefer the environment: arguments show in `ps`), every
route but /health needs `Authorization: Bearer <key>`.
"""


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``edje api`` options beyond the shared --url/--protocol/--collection."""
    group = parser.add_argument_group("HTTP API")
    group.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)"
    )
    group.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    group.add_argument(
        "--api-key", help=f"require this bearer key (default: ${API_KEY_ENV}, else none)"
    )
    group.add_argument(
        "--max-documents",
        type=int,
        default=DEFAULT_MAX_DOCUMENTS,
        help="documents per re-rank and images per index request (default: %(default)s)",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body (default: %(default)s)",
    )
    group.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help="largest single image (default: %(default)s)",
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send its body (default: %(default)s)",
    )
    group.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="info",
        help="default: %(default)s",
    )


def settings_from_args(args: argparse.Namespace) -> ApiSettings:
    """The :class:`ApiSettings` of parsed ``edje api`` arguments; bad values are usage errors."""
    try:
        return ApiSettings(
            collection=args.collection,
            url=args.url,
            protocol=args.protocol,
            host=args.host,
            port=args.port,
            api_key=args.api_key or ApiSettings.key_from_environment(),
            max_documents=args.max_documents,
            max_body_bytes=args.max_body_bytes,
            max_image_bytes=args.max_image_bytes,
            body_timeout=args.body_timeout,
            storage_options=storage_options(args.storage_option),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def cmd_api(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        from edje_client.api.server import serve
    except ImportError as exc:  # pragma: no cover - the api extra is part of `all`
        raise UsageError(f"the HTTP API needs: pip install 'edje-triton[api]' ({exc})") from exc
    serve(settings, log_level=args.log_level)
    return 0
