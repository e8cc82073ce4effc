"""Sync and async clients for the EDJE ensembles ``edje_index`` and ``edje_rank`` on Triton.

Both clients build their requests with :mod:`edje_client._core`; :class:`EDJEClient` keeps up to
``concurrency`` of them in flight with a thread pool, :class:`AsyncEDJEClient` with asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edje_client._core import (
    MODELS,
    OPTIONAL_MODELS,
    Call,
    Endpoint,
    ImageLike,
    RetryPolicy,
    ServerSpec,
    TokensLike,
    as_tokens,
    check_rerank_args,
    check_server_state,
    collection_rows,
    default_url,
    id_calls,
    index_calls,
    merge_id_scores,
    merge_index,
    merge_scores,
    merge_text_embeddings,
    progress_bar,
    rank_calls,
    rank_results,
    text_calls,
    unreachable,
)
from edje_client.errors import APIConnectionError, EDJEError
from edje_client.results import IndexResult, RerankResult

if TYPE_CHECKING:
    from edje_client.collection import ImageCollection

__all__ = ["EDJEClient", "AsyncEDJEClient"]

T = TypeVar("T")
Outputs = dict[str, np.ndarray]


class _ClientBase:
    """Settings, server shapes and argument checks common to both clients."""

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

    def _rerank_tokens(
        self, query: str, documents: TokensLike, top_n: int | None, ids: Sequence[str] | None
    ) -> np.ndarray:
        tokens = as_tokens(documents, self.spec)
        check_rerank_args(query, len(tokens), top_n, ids)
        return tokens

    def bank_holds(self, collection: ImageCollection) -> bool:
        """True when the server's token bank (``edje_rank_by_id``) serves this very collection.

        Then :meth:`score_ids` on the collection's rows equals :meth:`score` on its tokens, with
        8 bytes per pair on the wire instead of Q x D x 2. Compared by path (or URI), so it is
        False for a server that sees the collection under another path (``by_id=True`` forces).
        """
        bank = self.spec.bank_path
        if not bank:
            return False
        if "://" in bank or "://" in collection.uri:
            return bank.rstrip("/") == collection.uri.rstrip("/")
        return Path(bank).resolve() == collection.path.resolve()

    def _collection_documents(
        self,
        query: str,
        collection: ImageCollection,
        ids: Sequence[str] | None,
        top_n: int | None,
        by_id: bool | None,
    ) -> tuple[list[str], np.ndarray, bool]:
        """``(ids, rows or tokens, by_id)``: what :meth:`rerank_collection` sends."""
        ids, rows = collection_rows(collection, ids)
        check_rerank_args(query, len(rows), top_n, ids)
        use_bank = self.bank_holds(collection) if by_id is None else by_id
        return ids, (rows if use_bank else collection.tokens(rows)), use_bank

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

    def _with_retry(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                time.sleep(self._retry.backoff(exc, attempt))
                attempt += 1

    def _connect(self) -> ServerSpec:
        client, kwargs = self._client(), self._endpoint.call_kwargs
        live = self._with_retry(client.is_server_live, **kwargs)
        models = MODELS + OPTIONAL_MODELS
        ready = {m: self._with_retry(client.is_model_ready, m, **kwargs) for m in models}
        check_server_state(self._endpoint, live, ready)
        kwargs = self._endpoint.config_kwargs
        return ServerSpec.from_configs(
            {m: self._with_retry(client.get_model_config, m, **kwargs) for m in models if ready[m]}
        )

    def _infer(self, call: Call) -> Outputs:
        args = call.infer_args(self._endpoint.module)
        result = self._with_retry(self._client().infer, **args, **self._endpoint.call_kwargs)
        return call.parse(result)

    def _run(self, calls: list[Call], progress: bool, unit: str) -> list[Outputs]:
        with progress_bar(calls, progress, unit) as bar:

            def one(call: Call) -> Outputs:
                outputs = self._infer(call)
                bar.update(call.size)
                return outputs

            return list(self._executor.map(one, calls))

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
        calls = index_calls(images, self.spec)
        return merge_index(self._run(calls, progress, "img"), self.spec)

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
        return merge_scores(self._run(rank_calls(texts, tokens, self.spec), progress, "pair"))

    def embed_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """First-stage query embeddings (``edje_text_embed``), in ``index``'s embedding space.

        Returns float32 ``[N, E]``, L2-normalised; raises :class:`ModelNotReadyError` when the
        server lacks the optional ``edje_text_embed``.
        """
        calls = text_calls(texts, self.spec)
        return merge_text_embeddings(self._run(calls, progress, "text"), self.spec)

    def score_ids(
        self, query: str, image_ids: Sequence[int] | np.ndarray, progress: bool = False
    ) -> np.ndarray:
        """Logits of ``query`` against rows of the server's token bank (``edje_rank_by_id``).

        Raises :class:`ModelNotReadyError` without a bank, :class:`InvalidInputError` naming
        an id the bank does not hold.
        """
        return merge_id_scores(self._run(id_calls(query, image_ids, self.spec), progress, "pair"))

    def rerank(
        self,
        query: str,
        documents: TokensLike,
        top_n: int | None = None,
        return_probabilities: bool = False,
        ids: Sequence[str] | None = None,
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
        ids
            ``N`` ids to attach to the results (``RerankResult.id``).

        Returns
        -------
        list of RerankResult
            ``(index, score, id)`` sorted by score, descending; ties keep document order.
        """
        tokens = self._rerank_tokens(query, documents, top_n, ids)
        return rank_results(self.score(query, tokens), top_n, return_probabilities, ids)

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
        ids, documents, use_bank = self._collection_documents(query, collection, ids, top_n, by_id)
        scores = self.score_ids(query, documents) if use_bank else self.score(query, documents)
        return rank_results(scores, top_n, return_probabilities, ids)

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

    async def _with_retry(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        attempt = 0
        while True:
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                await asyncio.sleep(self._retry.backoff(exc, attempt))
                attempt += 1

    async def _connect(self) -> ServerSpec:
        client, kwargs = self._client, self._endpoint.call_kwargs
        live = await self._with_retry(client.is_server_live, **kwargs)
        models = MODELS + OPTIONAL_MODELS
        ready = {m: await self._with_retry(client.is_model_ready, m, **kwargs) for m in models}
        check_server_state(self._endpoint, live, ready)
        kwargs = self._endpoint.config_kwargs
        configs = {
            m: await self._with_retry(client.get_model_config, m, **kwargs)
            for m in models
            if ready[m]
        }
        return ServerSpec.from_configs(configs)

    async def _infer(self, call: Call) -> Outputs:
        args = call.infer_args(self._endpoint.module)
        result = await self._with_retry(self._client.infer, **args, **self._endpoint.call_kwargs)
        return call.parse(result)

    async def _run(self, calls: list[Call], progress: bool, unit: str) -> list[Outputs]:
        semaphore = asyncio.Semaphore(self._concurrency)
        with progress_bar(calls, progress, unit) as bar:

            async def one(call: Call) -> Outputs:
                async with semaphore:
                    outputs = await self._infer(call)
                bar.update(call.size)
                return outputs

            tasks = [asyncio.ensure_future(one(call)) for call in calls]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def index(self, images: Sequence[ImageLike], progress: bool = False) -> IndexResult:
        """Async :meth:`EDJEClient.index`."""
        await self.connect()
        calls = index_calls(images, self.spec)
        return merge_index(await self._run(calls, progress, "img"), self.spec)

    async def score(
        self, texts: str | Sequence[str], tokens: TokensLike, progress: bool = False
    ) -> np.ndarray:
        """Async :meth:`EDJEClient.score`."""
        await self.connect()
        calls = rank_calls(texts, tokens, self.spec)
        return merge_scores(await self._run(calls, progress, "pair"))

    async def embed_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Async :meth:`EDJEClient.embed_texts`."""
        await self.connect()
        calls = text_calls(texts, self.spec)
        return merge_text_embeddings(await self._run(calls, progress, "text"), self.spec)

    async def rerank(
        self,
        query: str,
        documents: TokensLike,
        top_n: int | None = None,
        return_probabilities: bool = False,
        ids: Sequence[str] | None = None,
    ) -> list[RerankResult]:
        """Async :meth:`EDJEClient.rerank`."""
        await self.connect()
        tokens = self._rerank_tokens(query, documents, top_n, ids)
        return rank_results(await self.score(query, tokens), top_n, return_probabilities, ids)

    async def score_ids(
        self, query: str, image_ids: Sequence[int] | np.ndarray, progress: bool = False
    ) -> np.ndarray:
        """See :meth:`EDJEClient.score_ids`."""
        await self.connect()
        calls = id_calls(query, image_ids, self.spec)
        return merge_id_scores(await self._run(calls, progress, "pair"))

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
        await self.connect()
        ids, documents, use_bank = self._collection_documents(query, collection, ids, top_n, by_id)
        if use_bank:
            scores = await self.score_ids(query, documents)
        else:
            scores = await self.score(query, documents)
        return rank_results(scores, top_n, return_probabilities, ids)

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
