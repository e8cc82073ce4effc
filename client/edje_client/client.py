"""Sync and async clients for the EDJE ensembles ``edje_index`` and ``edje_rank`` on Triton.

The twins differ only in how they send: every public method hands one builder of
:mod:`edje_client._core` (``index_plan``, ``score_plan`` ...) and its arguments to ``_run``,
which builds the :class:`~edje_client._core.Plan` once (validating the arguments) and sends its
requests, up to ``concurrency`` at a time: :class:`EDJEClient` on a thread pool,
:class:`AsyncEDJEClient` with asyncio. Connecting is the same two rounds of requests in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edje_client._core import (
    Call,
    Endpoint,
    ImageLike,
    Outputs,
    Plan,
    RetryPolicy,
    Rpc,
    ServerSpec,
    TokensLike,
    config_requests,
    connect_probes,
    default_url,
    embed_texts_plan,
    index_plan,
    read_spec,
    rerank_collection_plan,
    rerank_plan,
    score_plan,
    score_rows_plan,
    unreachable,
)
from edje_client.errors import APIConnectionError, EDJEError
from edje_client.results import IndexResult, RerankResult

if TYPE_CHECKING:
    from edje_client.collection import ImageCollection

__all__ = ["EDJEClient", "AsyncEDJEClient"]

R = TypeVar("R")
Builder = Callable[..., Plan[R]]  # a builder of _core: (spec, *arguments) -> Plan


class _ClientBase:
    """Settings, server shapes and the token-bank check common to both clients."""

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        timeout: float = 60.0,
        max_retries: int = 2,
        concurrency: int = 4,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive int, got {concurrency!r}")
        self._endpoint = Endpoint(url or default_url(protocol), protocol, float(timeout))
        self._retry = RetryPolicy(max_retries)
        self._concurrency = concurrency
        self._spec: ServerSpec | None = None
        self._closed = False
        self._open()

    def _open(self) -> None:
        """Set up the subclass's connections (called last by ``__init__``)."""
        raise NotImplementedError

    @property
    def spec(self) -> ServerSpec:
        """Shapes and batch limits read from the server's model configurations."""
        if self._closed:
            raise EDJEError("the client is closed")
        if self._spec is None:
            raise EDJEError("not connected yet: use `async with` or `await client.connect()`")
        return self._spec

    @property
    def num_tokens(self) -> int:
        """``Q``, compressed tokens per image."""
        return self.spec.num_tokens

    @property
    def token_width(self) -> int:
        """``D``, width of each compressed token."""
        return self.spec.token_width

    @property
    def embedding_dim(self) -> int:
        """``E``, size of the image embedding."""
        return self.spec.embedding_dim

    @contextlib.contextmanager
    def _connecting(self) -> Iterator[None]:
        try:
            yield
        except APIConnectionError as err:
            raise unreachable(self._endpoint, err) from err

    def bank_holds(self, collection: ImageCollection) -> bool:
        """True when the server's token bank (``edje_rank_by_id``) serves this very collection.

        Then :meth:`score_rows` on the collection's rows equals :meth:`score` on its tokens, with
        8 bytes per pair on the wire instead of Q x D x 2. Compared by path (or URI), so it is
        False for a server that sees the collection under another path (``by_id=True`` forces).
        """
        return self.spec.bank_holds(collection)

    def __repr__(self) -> str:
        url, protocol = self._endpoint.url, self._endpoint.protocol
        return f"{type(self).__name__}(url={url!r}, protocol={protocol!r})"


class EDJEClient(_ClientBase):
    """Client for an EDJE Triton server (index images, score and re-rank text queries).

    Connecting checks that the server is live and ``edje_index`` / ``edje_rank`` are ready, and
    reads the token shape ``[Q, D]``, the embedding size ``E`` and the batch limits.

    Parameters
    ----------
    url
        ``host:port`` of the server; default ``127.0.0.1:8001`` for gRPC, ``:8000`` for HTTP.
    protocol
        ``"grpc"`` or ``"http"``.
    timeout
        Seconds to wait for each request.
    max_retries
        Retries of a request that failed with a retryable error (connection errors, timeouts,
        HTTP 502/503/504, gRPC UNAVAILABLE), after exponential backoff with full jitter.
    concurrency
        Requests in flight at once when a call is split into several.

    Raises
    ------
    APIConnectionError
        The server cannot be reached.
    ModelNotReadyError
        A model is missing or not ready.

    Examples
    --------
    >>> with EDJEClient("127.0.0.1:8001") as client:  # doctest: +SKIP
    ...     tokens = client.index(["cat.jpg", "dog.png"]).tokens
    ...     best = client.rerank("a sleeping cat", tokens, top_n=1)[0]
    """

    def _open(self) -> None:
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(self._concurrency, thread_name_prefix="edje-client")
        try:
            with self._connecting():
                self._spec = self._connect()
        except BaseException:
            self.close()
            raise

    def _client(self) -> Any:
        """This thread's tritonclient client (the HTTP one is not thread-safe)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._endpoint.client()
            with self._lock:
                self._clients.append(client)
        return client

    def _send(self, rpc: Rpc) -> Any:
        """``rpc`` on this thread's client, retried as the retry policy says."""
        attempt = 0
        while True:
            try:
                return rpc.send(self._client())
            except Exception as exc:
                time.sleep(self._retry.backoff(exc, attempt))
                attempt += 1

    def _connect(self) -> ServerSpec:
        answers = [self._send(rpc) for rpc in connect_probes(self._endpoint)]
        requests = config_requests(self._endpoint, answers)
        return read_spec(requests, [self._send(rpc) for rpc in requests])

    def _run(self, build: Builder[R], *args: Any, progress: bool = False) -> R:
        """Build the plan of ``build(spec, *args)`` and send its requests on the thread pool."""
        plan = build(self.spec, *args)
        with plan.progress_bar(progress) as bar:

            def one(call: Call) -> Outputs:
                outputs = call.parse(self._send(call.rpc(self._endpoint)))
                bar.update(call.size)
                return outputs

            outputs = list(self._executor.map(one, plan.calls))
        return plan.merge(outputs)

    def index(self, images: Sequence[ImageLike], progress: bool = False) -> IndexResult:
        """Compressed tokens and embeddings of images (``edje_index``).

        Parameters
        ----------
        images
            Paths, encoded bytes (JPEG, PNG, WEBP, GIF, BMP, TIFF) or PIL images (sent as
            PNG). Split into requests of the server's max batch size.
        progress
            Show a tqdm progress bar.

        Returns
        -------
        IndexResult
            ``tokens`` float16 ``[N, Q, D]`` and ``embeddings`` float32 ``[N, E]``, in input
            order.

        Raises
        ------
        InvalidInputError
            An image cannot be read, or the server cannot decode one (with its message).
        """
        return self._run(index_plan, images, progress=progress)

    def score(
        self, texts: str | Sequence[str], tokens: TokensLike, progress: bool = False
    ) -> np.ndarray:
        """Matching logits of text / token-block pairs (``edje_rank``).

        Parameters
        ----------
        texts
            One string (scored against every block) or ``N`` strings, one per block.
        tokens
            ``[N, Q, D]`` compressed tokens (float16; other float dtypes are cast), or a list
            of ``[Q, D]`` arrays.
        progress
            Show a tqdm progress bar.

        Returns
        -------
        numpy.ndarray
            float32 ``[N]`` raw logits (higher is a better match).

        Raises
        ------
        InvalidInputError
            Tokens of the wrong shape or non-finite, or texts that do not match the blocks.
        """
        return self._run(score_plan, texts, tokens, progress=progress)

    def embed_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """First-stage query embeddings (``edje_text_embed``), in ``index``'s embedding space.

        Returns float32 ``[N, E]``, L2-normalised; raises :class:`ModelNotReadyError` when the
        server lacks the optional ``edje_text_embed``.
        """
        return self._run(embed_texts_plan, texts, progress=progress)

    def score_rows(
        self, query: str, rows: Sequence[int] | np.ndarray, progress: bool = False
    ) -> np.ndarray:
        """Logits of ``query`` against rows of the server's token bank (``edje_rank_by_id``).

        ``rows`` are row numbers of the bank's collection (its integer image ids). Raises
        :class:`ModelNotReadyError` without a bank, :class:`InvalidInputError` naming a row the
        bank does not hold.
        """
        return self._run(score_rows_plan, query, rows, progress=progress)

    def rerank(
        self,
        query: str,
        documents: TokensLike,
        top_n: int | None = None,
        return_probabilities: bool = False,
        labels: Sequence[str] | None = None,
    ) -> list[RerankResult]:
        """Sort documents by how well they match ``query``, best first.

        Parameters
        ----------
        query
            The text query.
        documents
            Compressed tokens ``[N, Q, D]`` of the candidate images, or a list of ``[Q, D]``.
        top_n
            Keep only the best ``top_n`` results (all when ``None``).
        return_probabilities
            Report ``sigmoid(logit)`` instead of the raw logit.
        labels
            ``N`` labels, one per document, reported as the results' ``id``.

        Returns
        -------
        list of RerankResult
            ``(index, score, id)`` sorted by score, descending; ties keep document order.
        """
        args = (query, documents, top_n, return_probabilities, labels)
        return self._run(rerank_plan, *args)

    def rerank_collection(
        self,
        query: str,
        collection: ImageCollection,
        ids: Sequence[str] | None = None,
        top_n: int | None = None,
        return_probabilities: bool = False,
        by_id: bool | None = None,
    ) -> list[RerankResult]:
        """:meth:`rerank` the images ``ids`` of a collection (all of them when ``None``).

        Results carry the collection's ids; an id it lacks raises :class:`InvalidInputError`.
        With ``by_id`` (default: when :meth:`bank_holds` the collection) only row numbers are
        sent and the server's token bank supplies the tokens.
        """
        args = (query, collection, ids, top_n, return_probabilities, by_id)
        return self._run(rerank_collection_plan, *args)

    def close(self) -> None:
        """Stop the worker threads and close the connections. Idempotent."""
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()

    def __enter__(self) -> EDJEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEDJEClient(_ClientBase):
    """The asyncio twin of :class:`EDJEClient` (same parameters, methods and errors).

    It connects on ``async with``, on :meth:`connect`, or on its first request; the shape
    properties are available once connected.

    Examples
    --------
    >>> async with AsyncEDJEClient("127.0.0.1:8001") as client:  # doctest: +SKIP
    ...     result = await client.index(["cat.jpg"])
    ...     scores = await client.score("a cat", result.tokens)
    """

    def _open(self) -> None:
        self._client: Any = None
        self._connect_lock = asyncio.Lock()

    async def connect(self) -> AsyncEDJEClient:
        """Check the server and read the model shapes (once); return ``self``."""
        async with self._connect_lock:
            if self._spec is None:
                if self._closed:
                    raise EDJEError("the client is closed")
                self._client = self._endpoint.client(aio=True)
                try:
                    with self._connecting():
                        self._spec = await self._connect()
                except BaseException:
                    await self.close()
                    raise
        return self

    async def _send(self, rpc: Rpc) -> Any:
        """``rpc`` on the client, retried as the retry policy says."""
        attempt = 0
        while True:
            try:
                return await rpc.send(self._client)
            except Exception as exc:
                await asyncio.sleep(self._retry.backoff(exc, attempt))
                attempt += 1

    async def _connect(self) -> ServerSpec:
        answers = [await self._send(rpc) for rpc in connect_probes(self._endpoint)]
        requests = config_requests(self._endpoint, answers)
        return read_spec(requests, [await self._send(rpc) for rpc in requests])

    async def _run(self, build: Builder[R], *args: Any, progress: bool = False) -> R:
        """Connect, build the plan of ``build(spec, *args)`` and send its requests as tasks."""
        await self.connect()
        plan = build(self.spec, *args)
        semaphore = asyncio.Semaphore(self._concurrency)
        with plan.progress_bar(progress) as bar:

            async def one(call: Call) -> Outputs:
                async with semaphore:
                    outputs = call.parse(await self._send(call.rpc(self._endpoint)))
                bar.update(call.size)
                return outputs

            tasks = [asyncio.ensure_future(one(call)) for call in plan.calls]
            try:
                outputs = list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return plan.merge(outputs)

    async def index(self, images: Sequence[ImageLike], progress: bool = False) -> IndexResult:
        """Async :meth:`EDJEClient.index`."""
        return await self._run(index_plan, images, progress=progress)

    async def score(
        self, texts: str | Sequence[str], tokens: TokensLike, progress: bool = False
    ) -> np.ndarray:
        """Async :meth:`EDJEClient.score`."""
        return await self._run(score_plan, texts, tokens, progress=progress)

    async def embed_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Async :meth:`EDJEClient.embed_texts`."""
        return await self._run(embed_texts_plan, texts, progress=progress)

    async def score_rows(
        self, query: str, rows: Sequence[int] | np.ndarray, progress: bool = False
    ) -> np.ndarray:
        """Async :meth:`EDJEClient.score_rows`."""
        return await self._run(score_rows_plan, query, rows, progress=progress)

    async def rerank(
        self,
        query: str,
        documents: TokensLike,
        top_n: int | None = None,
        return_probabilities: bool = False,
        labels: Sequence[str] | None = None,
    ) -> list[RerankResult]:
        """Async :meth:`EDJEClient.rerank`."""
        args = (query, documents, top_n, return_probabilities, labels)
        return await self._run(rerank_plan, *args)

    async def rerank_collection(
        self,
        query: str,
        collection: ImageCollection,
        ids: Sequence[str] | None = None,
        top_n: int | None = None,
        return_probabilities: bool = False,
        by_id: bool | None = None,
    ) -> list[RerankResult]:
        """Async :meth:`EDJEClient.rerank_collection`."""
        args = (query, collection, ids, top_n, return_probabilities, by_id)
        return await self._run(rerank_collection_plan, *args)

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def __aenter__(self) -> AsyncEDJEClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
