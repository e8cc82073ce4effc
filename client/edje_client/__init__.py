"""Thin Python client for EDJE on Triton (needs tritonclient, numpy and Pillow; never torch)."""

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
