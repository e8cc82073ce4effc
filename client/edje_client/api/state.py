"""What one API process holds: its Triton client, its collection, its metrics.

**Threads, not asyncio, for the work.** The routes are plain functions that FastAPI runs on its
thread pool, calling the blocking :class:`~edje_client.client.EDJEClient` (thread-safe: one
tritonclient connection per thread). :class:`~edje_client.client.AsyncEDJEClient` would not
keep the event loop free: its plans read the collection (Lance lookups and gathers, file I/O)
synchronously while they are built, and so do search's first stage and the image route. On
threads, a slow Lance read or Triton call holds one worker, never the loop, and the loop keeps
accepting and reading other requests (slow clients included: see :mod:`.security`).

**One collection, one lock per call.** :class:`~edje_client.collection.ImageCollection` is not
thread-safe, so :class:`LockedCollection` holds a lock around each of its calls, never around a
Triton request. That is enough because rows are append-only and immutable: a row found by one
call means the same image in every later one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edje_client._core import KNOWN_MODELS, MODELS, Endpoint, connect_probes, default_url
from edje_client.api.metrics import ApiMetrics
from edje_client.api.settings import ApiSettings
from edje_client.client import EDJEClient
from edje_client.collection import CollectionMismatchError, ImageCollection
from edje_client.errors import EDJEError

log = logging.getLogger("edje.api")

RECONNECT_SECONDS = 1.0  # at most one connection attempt per second while Triton is away
PROBE_TIMEOUT = 2.0


class LockedCollection:
    """An :class:`ImageCollection` shared by threads: each method call holds the lock.

    Attribute reads go through too (``uri``, ``spec``, ``version`` ...), as do ``len()`` and
    ``in``. Calls refresh to the collection's newest version at most every ``refresh_seconds``,
    so rows other writers commit become visible. :meth:`locked` gives the collection itself for
    a sequence of calls that must see one version.
    """

    def __init__(self, collection: ImageCollection, refresh_seconds: float) -> None:
        self._collection = collection
        self._lock = threading.RLock()
        self._refresh_seconds = refresh_seconds
        self._refreshed = time.monotonic()

    @contextlib.contextmanager
    def locked(self) -> Iterator[ImageCollection]:
        with self._lock:
            now = time.monotonic()
            if now - self._refreshed >= self._refresh_seconds:
                self._refreshed = now
                self._collection.refresh()
            yield self._collection

    def __getattr__(self, name: str) -> Any:
        with self.locked() as collection:
            value = getattr(collection, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.locked():
                return value(*args, **kwargs)

        return call

    def __len__(self) -> int:
        with self.locked() as collection:
            return len(collection)

    def __contains__(self, image_id: object) -> bool:
        with self.locked() as collection:
            return image_id in collection


class TritonLink:
    """The app's one :class:`EDJEClient`, connected on first need and after Triton comes back.

    While Triton is unreachable, :meth:`client` raises :class:`APIConnectionError` (503) at
    once, trying to connect again at most every second. On connecting, the collection is
    checked against the served model (Q, D, E and the model's identity); a new collection
    takes the server's shape.
    """

    def __init__(
        self,
        settings: ApiSettings,
        collection: LockedCollection,
        factory: Callable[..., EDJEClient] = EDJEClient,
    ) -> None:
        self.settings = settings
        self.endpoint = Endpoint(
            settings.url or default_url(settings.protocol), settings.protocol, PROBE_TIMEOUT
        )
        self._collection = collection
        self._factory = factory
        self._client: EDJEClient | None = None
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._last_error: EDJEError | None = None
        self._probe: Any = None
        self._probe_lock = threading.Lock()

    def client(self) -> EDJEClient:
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                if time.monotonic() < self._retry_at and self._last_error is not None:
                    raise self._last_error
                try:
                    self._client = self._connect()
                except EDJEError as err:
                    self._retry_at, self._last_error = time.monotonic() + RECONNECT_SECONDS, err
                    log.warning("cannot use the Triton server: %s", err.message)
                    raise
            return self._client

    def _connect(self) -> EDJEClient:
        s = self.settings
        client = self._factory(
            url=self.endpoint.url,
            protocol=s.protocol,
            timeout=s.timeout,
            max_retries=s.max_retries,
            concurrency=s.concurrency,
        )
        expected = client.spec.collection_spec()
        with self._collection.locked() as collection:
            if collection.spec is None:
                collection.spec = expected
            differences = collection.spec.differences(expected)
        if differences:
            client.close()
            raise CollectionMismatchError(
                "the collection was made by another model or shape: " + "; ".join(differences)
            )
        return client

    def probe(self) -> dict[str, Any]:
        """Triton's liveness and the readiness of each model, asked now (for ``/health``)."""
        with self._probe_lock:
            try:
                if self._probe is None:
                    self._probe = self.endpoint.client()
                live, *ready = [rpc.send(self._probe) for rpc in connect_probes(self.endpoint)]
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                with contextlib.suppress(Exception):
                    self._probe.close()
                self._probe = None
                return {"live": False, "ready": False, "error": type(exc).__name__}
        models = dict(zip(KNOWN_MODELS, ready, strict=True))
        ok = bool(live) and all(models[m] for m in MODELS)
        return {"live": bool(live), "ready": ok, "models": models}

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        with self._probe_lock, contextlib.suppress(Exception):
            if self._probe is not None:
                self._probe.close()
            self._probe = None


class AppState:
    """Everything the routes share: opened in the app's lifespan, closed after it."""

    collection: LockedCollection
    link: TritonLink

    def __init__(
        self, settings: ApiSettings, factory: Callable[..., EDJEClient] = EDJEClient
    ) -> None:
        self.settings = settings
        self.metrics = ApiMetrics()
        self.index_lock = threading.Lock()  # one /v1/index at a time: check, index, commit
        self._factory = factory

    def open(self) -> AppState:
        """Open the collection and connect to Triton; a Triton that is not up yet is tried
        again on the first request that needs it."""
        s = self.settings
        collection = ImageCollection(s.collection, storage_options=s.storage_options)
        self.collection = LockedCollection(collection, s.refresh_seconds)
        self.link = TritonLink(s, self.collection, self._factory)
        with contextlib.suppress(EDJEError):
            self.link.client()
        return self

    @property
    def collection_name(self) -> str:
        return Path(self.settings.collection.rstrip("/")).name

    def close(self) -> None:
        self.link.close()
        with self.collection.locked() as collection:
            collection.close()
