"""Thin Python client for EDJE on Triton (tritonclient, numpy, Pillow and pylance; never torch).

* Talking to Triton: ``client`` (``EDJEClient`` and its asyncio twin), ``errors`` (one
  exception tree), ``results``, ``server`` (the embedded ``tritonserver``).
* Storing images: ``collection`` (one Lance dataset per collection) with ``collection_format``,
  ``first_stage`` (its exact or indexed search), ``distributed`` (indexing on Ray Data) and
  ``legacy_store`` (migration from the earlier format).
* Using them: ``search``, ``evaluation``, the ``edje`` command (``cli``, ``collection_cli``) and
  the HTTP API (``api``).
"""

from edje_client.client import AsyncEDJEClient, EDJEClient
from edje_client.errors import (
    APIConnectionError,
    APITimeoutError,
    EDJEError,
    InvalidInputError,
    ModelNotReadyError,
    ServerError,
)
from edje_client.results import IndexResult, RerankResult

__version__ = "0.1.0"

__all__ = [
    "EDJEClient",
    "AsyncEDJEClient",
    "IndexResult",
    "RerankResult",
    "EDJEError",
    "APIConnectionError",
    "APITimeoutError",
    "InvalidInputError",
    "ModelNotReadyError",
    "ServerError",
]
