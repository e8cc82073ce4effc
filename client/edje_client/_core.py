"""Protocol-agnostic logic shared by :class:`EDJEClient` and :class:`AsyncEDJEClient`.

Every public call of a client is built here once, as a :class:`Plan` (its requests, the merge of
their outputs, the progress unit) by one builder per method (``index_plan``, ``score_plan`` ...,
``rerank_collection_plan``), which validates every argument first. Connecting is two rounds of
:class:`Rpc` (:func:`connect_probes`, :func:`config_requests`). Parsing, chunking, ranking and
the retry policy live here too; the two clients only send (threads or asyncio) and wait.
"""

from __future__ import annotations

import importlib
import io
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from edje_client.errors import (
    APIConnectionError,
    EDJEError,
    InvalidInputError,
    ModelNotReadyError,
    as_edje_error,
)
from edje_client.results import IndexResult, RerankResult

if TYPE_CHECKING:
    from edje_client.collection import CollectionSpec, ImageCollection

INDEX_MODEL = "edje_index"
RANK_MODEL = "edje_rank"
TEXT_MODEL = "edje_text_embed"
BY_ID_MODEL = "edje_rank_by_id"
BANK_MODEL = "edje_token_bank"
MODELS = (INDEX_MODEL, RANK_MODEL)  # required
OPTIONAL_MODELS = (TEXT_MODEL, BY_ID_MODEL, BANK_MODEL)  # used when the server has them
KNOWN_MODELS = MODELS + OPTIONAL_MODELS
PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}

ImageLike = str | os.PathLike | bytes | Image.Image
TokensLike = np.ndarray | Sequence[np.ndarray]
Outputs = dict[str, np.ndarray]
Input = tuple[str, np.ndarray, str]  # (name, array, Triton datatype)
R = TypeVar("R")
S = TypeVar("S")

# PIL modes PNG stores as they are; any other mode is converted to RGB first.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})


def default_url(protocol: str) -> str:
    """``127.0.0.1`` with Triton's default port for ``protocol``."""
    return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"


@dataclass(frozen=True)
class Endpoint:
    """Where the server is and how to talk to it: the per-protocol details of tritonclient."""

    url: str
    protocol: str
    timeout: float

    def __post_init__(self) -> None:
        if "://" in self.url:
            raise ValueError(f"url is host:port without a scheme, got {self.url!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")

    @property
    def module(self) -> ModuleType:
        """``tritonclient.http`` or ``tritonclient.grpc`` (their ``InferInput`` classes)."""
        return importlib.import_module(f"tritonclient.{self.protocol}")

    def client(self, aio: bool = False) -> Any:
        """A new tritonclient ``InferenceServerClient`` (from ``.aio`` when ``aio``)."""
        module = importlib.import_module(f"tritonclient.{self.protocol}{'.aio' if aio else ''}")
        if self.protocol == "grpc":
            return module.InferenceServerClient(self.url)
        if aio:
            return module.InferenceServerClient(self.url, conn_timeout=self.timeout)
        return module.InferenceServerClient(
            self.url, connection_timeout=self.timeout, network_timeout=self.timeout
        )

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """Per-call keyword arguments (gRPC takes the deadline per call, HTTP per client)."""
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    @property
    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``get_model_config`` that make both protocols return a dict."""
        return {"as_json": True, **self.call_kwargs} if self.protocol == "grpc" else {}


@dataclass(frozen=True)
class Rpc:
    """One method call on a tritonclient client, the same for the sync and the async client."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def send(self, client: Any) -> Any:
        """``client.method(*args, **kwargs)`` (an awaitable on an ``.aio`` client)."""
        return getattr(client, self.method)(*self.args, **self.kwargs)


def check_server_state(endpoint: Endpoint, live: bool, ready: dict[str, bool]) -> None:
    """Raise when the server is not live or a required model (:data:`MODELS`) is not ready."""
    if not live:
        raise APIConnectionError(f"the server at {endpoint.url} ({endpoint.protocol}) is not live")
    for model in MODELS:
        if not ready[model]:
            raise ModelNotReadyError(
                f"model {model!r} is not ready on the server at {endpoint.url}; check that the "
                "model repository holds it and that it loaded (see the server log)"
            )


def unreachable(endpoint: Endpoint, error: EDJEError) -> EDJEError:
    """``error`` restated with the server's address, for failures while connecting."""
    return type(error)(
        f"cannot reach the EDJE server at {endpoint.url} ({endpoint.protocol}): {error.message}",
        error.status,
    )


def _dims(config: dict[str, Any], section: str, name: str) -> tuple[int, ...]:
    for tensor in config.get(section, []):
        if tensor["name"] == name:
            return tuple(int(d) for d in tensor["dims"])
    raise EDJEError(f"model {config.get('name')!r} has no {section} tensor {name!r}")


def _max_batch(config: dict[str, Any]) -> int:
    size = int(config.get("max_batch_size", 0))
    if size <= 0:
        raise EDJEError(f"model {config.get('name')!r} must batch (max_batch_size > 0)")
    return size


@dataclass(frozen=True)
class ServerSpec:
    """Shapes and batch limits read from the server's model configurations.

    ``text_batch`` is ``None`` when the server lacks the optional ``edje_text_embed``;
    ``bank_batch`` (ids per request) and ``bank_path`` are ``None`` without a token bank
    (``edje_rank_by_id``). ``model_id`` names the served model (``""`` when the server does
    not say).
    """

    num_tokens: int
    token_width: int
    embedding_dim: int
    index_batch: int
    rank_batch: int
    text_batch: int | None = None
    bank_batch: int | None = None
    bank_path: str | None = None
    model_id: str = ""

    @classmethod
    def from_configs(cls, configs: dict[str, dict[str, Any]]) -> ServerSpec:
        """Parse the ready models' configurations (model name -> either protocol's JSON)."""
        configs = {name: c.get("config", c) for name, c in configs.items()}
        index_config, rank_config = configs[INDEX_MODEL], configs[RANK_MODEL]
        text_config = configs.get(TEXT_MODEL)
        q, d = _dims(index_config, "output", "compressed_tokens")
        (e,) = _dims(index_config, "output", "image_embedding")
        rank_dims = _dims(rank_config, "input", "compressed_tokens")
        if rank_dims != (q, d):
            raise EDJEError(
                f"server models disagree: {INDEX_MODEL} makes tokens {[q, d]} but {RANK_MODEL} "
                f"takes {list(rank_dims)}"
            )
        text_batch = None
        if text_config is not None:
            text_config = text_config.get("config", text_config)
            text_batch = _max_batch(text_config)
            if _dims(text_config, "output", "text_embedding") != (e,):
                raise EDJEError(f"server models disagree on the embedding size {e}")
        bank_batch = bank_path = None
        if BY_ID_MODEL in configs and BANK_MODEL in configs:
            parameters = configs[BANK_MODEL].get("parameters", {})
            bank_path = parameters.get("bank_path", {}).get("string_value") or None
            bank_batch = int(parameters.get("max_ids", {}).get("string_value") or 1)
        model_id = index_config.get("parameters", {}).get("model_id", {}).get("string_value", "")
        return cls(
            q,
            d,
            e,
            _max_batch(index_config),
            _max_batch(rank_config),
            text_batch,
            bank_batch,
            bank_path,
            model_id,
        )

    def collection_spec(self, token_dtype: str = "float16") -> CollectionSpec:
        """The :class:`~edje_client.collection.CollectionSpec` of what this server indexes."""
        from edje_client.collection import CollectionSpec

        return CollectionSpec(
            self.num_tokens, self.token_width, self.embedding_dim, token_dtype, self.model_id
        )

    def bank_holds(self, collection: ImageCollection) -> bool:
        """True when the server's token bank is ``collection`` (same path, or same URI)."""
        bank = self.bank_path
        if not bank:
            return False
        if "://" in bank or "://" in collection.uri:
            return bank.rstrip("/") == collection.uri.rstrip("/")
        return Path(bank).resolve() == collection.path.resolve()


def connect_probes(endpoint: Endpoint) -> list[Rpc]:
    """Connecting, round one: is the server live, and is each of :data:`KNOWN_MODELS` ready."""
    kwargs = endpoint.call_kwargs
    ready = [Rpc("is_model_ready", (model,), kwargs) for model in KNOWN_MODELS]
    return [Rpc("is_server_live", (), kwargs), *ready]


def config_requests(endpoint: Endpoint, answers: Sequence[bool]) -> list[Rpc]:
    """Round two: check round one's ``answers``, then ask for the ready models' configurations."""
    live, *ready = answers
    ready_models = dict(zip(KNOWN_MODELS, ready, strict=True))
    check_server_state(endpoint, live, ready_models)
    kwargs = endpoint.config_kwargs
    return [Rpc("get_model_config", (m,), kwargs) for m in KNOWN_MODELS if ready_models[m]]


def read_spec(requests: Sequence[Rpc], configs: Sequence[dict[str, Any]]) -> ServerSpec:
    """The :class:`ServerSpec` in the answers to :func:`config_requests`."""
    return ServerSpec.from_configs(
        {rpc.args[0]: c for rpc, c in zip(requests, configs, strict=True)}
    )


@dataclass(frozen=True)
class Call:
    """One inference request, independent of protocol and of sync/async."""

    model: str
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]

    @property
    def size(self) -> int:
        """Rows in the request (for progress bars)."""
        return len(self.inputs[0][1])

    def rpc(self, endpoint: Endpoint) -> Rpc:
        """The ``infer`` call, built with ``endpoint``'s protocol classes and deadline."""
        module = endpoint.module
        inputs = []
        for name, array, dtype in self.inputs:
            tensor = module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [module.InferRequestedOutput(name) for name in self.outputs]
        kwargs = {"model_name": self.model, "inputs": inputs, "outputs": outputs}
        return Rpc("infer", (), {**kwargs, **endpoint.call_kwargs})

    def parse(self, result: Any) -> Outputs:
        """Output name -> array of an ``InferResult``."""
        arrays = {name: result.as_numpy(name) for name in self.outputs}
        missing = [name for name, array in arrays.items() if array is None]
        if missing:
            raise EDJEError(f"the response of {self.model!r} lacks outputs {missing}")
        return arrays


@dataclass(frozen=True)
class Plan(Generic[R]):
    """One public call, built once: its requests, how their outputs become the result, and
    what one row of the progress bar is called.

    A client sends ``calls`` (several in flight) and hands their outputs, in call order, to
    ``merge``. The builders (``*_plan``, one per client method, each taking the
    :class:`ServerSpec` first) check every argument before anything is sent, so both clients
    validate the same way, once.
    """

    calls: tuple[Call, ...]
    merge: Callable[[list[Outputs]], R]
    unit: str

    def then(self, finish: Callable[[R], S]) -> Plan[S]:
        """The same requests, with ``finish`` applied to the merged result."""
        merge = self.merge
        return Plan(self.calls, lambda outputs: finish(merge(outputs)), self.unit)

    def progress_bar(self, enabled: bool) -> tqdm:
        """A tqdm bar over the rows of the calls (disabled unless ``enabled``)."""
        total = sum(call.size for call in self.calls)
        return tqdm(total=total, disable=not enabled, unit=self.unit, leave=False)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _split(
    model: str,
    batch: int,
    inputs: tuple[Input, ...],
    outputs: tuple[str, ...],
    shared: tuple[Input, ...] = (),
) -> tuple[Call, ...]:
    """Requests of at most ``batch`` rows: ``inputs`` are cut by rows, ``shared`` sent whole."""
    pieces = _chunks(len(inputs[0][1]), batch)
    return tuple(
        Call(model, tuple((name, a[s], dtype) for name, a, dtype in inputs) + shared, outputs)
        for s in pieces
    )


def _concat(outputs: list[Outputs], name: str, empty: np.ndarray) -> np.ndarray:
    """Output ``name`` of every request, in request order (``empty`` sets shape and dtype)."""
    return np.concatenate([empty, *(o[name] for o in outputs)])


def _scores(name: str) -> Callable[[list[Outputs]], np.ndarray]:
    """The merge of a scoring model: output ``name`` ``[n, 1]`` of every request as float32 [N]."""
    return lambda outputs: _concat(outputs, name, np.zeros((0, 1), np.float32))[:, 0]


def _bytes_column(items: Sequence[bytes]) -> np.ndarray:
    column = np.empty((len(items), 1), dtype=object)
    column[:, 0] = list(items)
    return column


def _text_column(texts: Sequence[str]) -> np.ndarray:
    return _bytes_column([t.encode("utf-8") for t in texts])


def encode_image(item: ImageLike) -> bytes:
    """Encoded image bytes of a path, raw bytes, or a PIL image (encoded as PNG)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, Image.Image):
        image = item if item.mode in _PNG_MODES else item.convert("RGB")
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()
    if isinstance(item, (str, os.PathLike)):
        try:
            with open(item, "rb") as f:
                return f.read()
        except OSError as exc:
            raise InvalidInputError(f"cannot read image {os.fspath(item)!r}: {exc}") from exc
    raise InvalidInputError(
        f"an image must be a path, bytes or a PIL image, got {type(item).__name__}"
    )


def as_tokens(tokens: TokensLike, spec: ServerSpec) -> np.ndarray:
    """``tokens`` as a C-contiguous float16 ``[N, Q, D]`` array, checked against the server."""
    q, d = spec.num_tokens, spec.token_width
    if isinstance(tokens, (list, tuple)):
        if not tokens:
            return np.zeros((0, q, d), dtype=np.float16)
        try:
            tokens = np.stack([np.asarray(t) for t in tokens])
        except ValueError as exc:
            raise InvalidInputError(f"token blocks must all have shape [{q}, {d}]: {exc}") from exc
    array = np.asarray(tokens)
    if array.ndim != 3 or array.shape[1:] != (q, d):
        raise InvalidInputError(f"tokens must have shape [N, {q}, {d}], got {list(array.shape)}")
    if array.dtype.kind not in "fiu":
        raise InvalidInputError(f"tokens must be a float array, got dtype {array.dtype}")
    with np.errstate(over="ignore"):
        array = np.ascontiguousarray(array, dtype=np.float16)
    if not np.isfinite(array).all():
        raise InvalidInputError("tokens hold NaN or infinite values (or values beyond float16)")
    return array


def as_texts(texts: str | Sequence[str], n: int) -> list[str]:
    """``texts`` as ``n`` strings: one string is repeated, a list must hold exactly ``n``."""
    if isinstance(texts, str):
        return [texts] * n
    texts = list(texts)
    if len(texts) != n:
        raise InvalidInputError(f"got {len(texts)} texts for {n} token blocks")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise InvalidInputError(f"texts must be str, got {type(bad).__name__}")
    return texts


def check_rerank_args(query: str, n: int, top_n: int | None, labels: Sequence[str] | None) -> None:
    """Raise :class:`InvalidInputError` for a bad query, ``top_n`` or ``labels`` of a re-rank."""
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a str, got {type(query).__name__}")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise InvalidInputError(f"top_n must be a non-negative int or None, got {top_n!r}")
    if labels is not None and len(labels) != n:
        raise InvalidInputError(f"got {len(labels)} labels for {n} documents")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, without overflow for large ``|x|``."""
    return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))).astype(np.float32)


def rank_results(
    scores: np.ndarray, top_n: int | None, probabilities: bool, labels: Sequence[str] | None
) -> list[RerankResult]:
    """Results sorted best first (ties keep document order), cut to ``top_n``.

    ``labels[i]`` becomes the ``id`` of document ``i``'s result.
    """
    order = np.argsort(-scores, kind="stable")[:top_n]
    values = sigmoid(scores) if probabilities else scores
    return [
        RerankResult(int(i), float(values[i]), None if labels is None else labels[i]) for i in order
    ]


def collection_rows(collection: Any, ids: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    """``(ids, rows)`` of ``ids`` in an image collection (all, in row order, when ``None``).

    Rows are the token bank's integer image ids; an unknown id is an :class:`InvalidInputError`.
    """
    if isinstance(ids, str):
        raise InvalidInputError("ids must be a list of str, not a single string")
    if ids is None:
        return collection.ids(), np.arange(len(collection), dtype=np.int64)
    ids = list(ids)
    try:
        return ids, collection.rows_of(ids)
    except KeyError as exc:
        raise InvalidInputError(str(exc.args[0])) from exc


def bank_or_tokens(
    collection: ImageCollection,
    rows: np.ndarray,
    by_id: bool | None,
    bank_holds: Callable[[ImageCollection], bool],
    by_rows: Callable[[np.ndarray], R],
    by_tokens: Callable[[np.ndarray], R],
) -> R:
    """Score ``rows`` of a collection the one way EDJE chooses: ``by_rows(rows)`` (the server's
    token bank reads the tokens) when ``by_id`` (default: when ``bank_holds(collection)``), else
    ``by_tokens`` of the rows' tokens.

    ``by_rows`` and ``by_tokens`` are a client's ``score_rows`` and ``score`` with the query
    bound, or the builders of their plans.
    """
    use_bank = bank_holds(collection) if by_id is None else by_id
    return by_rows(rows) if use_bank else by_tokens(collection.tokens(rows))


# ---------------------------------------------------------------- the builders, one per method


def index_plan(spec: ServerSpec, images: Sequence[ImageLike]) -> Plan[IndexResult]:
    """:meth:`EDJEClient.index`: ``edje_index`` requests, the server's max batch size each."""
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        raise InvalidInputError("images must be a list (wrap a single image in a list)")
    payloads = _bytes_column([encode_image(item) for item in images])
    outputs = ("compressed_tokens", "image_embedding")
    calls = _split(INDEX_MODEL, spec.index_batch, (("image", payloads, "BYTES"),), outputs)
    no_tokens = np.zeros((0, spec.num_tokens, spec.token_width), np.float16)
    no_embeddings = np.zeros((0, spec.embedding_dim), np.float32)

    def merge(outputs: list[Outputs]) -> IndexResult:
        return IndexResult(
            _concat(outputs, "compressed_tokens", no_tokens),
            _concat(outputs, "image_embedding", no_embeddings),
        )

    return Plan(calls, merge, "img")


def score_plan(
    spec: ServerSpec, texts: str | Sequence[str], tokens: TokensLike
) -> Plan[np.ndarray]:
    """:meth:`EDJEClient.score`: ``edje_rank`` requests, each text against its token block."""
    return _pairs(spec, texts, as_tokens(tokens, spec))


def _pairs(spec: ServerSpec, texts: str | Sequence[str], tokens: np.ndarray) -> Plan[np.ndarray]:
    """:func:`score_plan` of tokens that :func:`as_tokens` has already checked."""
    encoded = _text_column(as_texts(texts, len(tokens)))
    inputs = (("text", encoded, "BYTES"), ("compressed_tokens", tokens, "FP16"))
    return Plan(_split(RANK_MODEL, spec.rank_batch, inputs, ("score",)), _scores("score"), "pair")


def embed_texts_plan(spec: ServerSpec, texts: Sequence[str]) -> Plan[np.ndarray]:
    """:meth:`EDJEClient.embed_texts`: ``edje_text_embed`` requests, float32 ``[N, E]``."""
    if spec.text_batch is None:
        raise ModelNotReadyError(f"the server has no {TEXT_MODEL!r} model to embed texts")
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list (wrap a single text in a list)")
    encoded = _text_column(as_texts(texts, len(texts)))
    calls = _split(TEXT_MODEL, spec.text_batch, (("text", encoded, "BYTES"),), ("text_embedding",))
    empty = np.zeros((0, spec.embedding_dim), np.float32)
    return Plan(calls, lambda outputs: _concat(outputs, "text_embedding", empty), "text")


def score_rows_plan(
    spec: ServerSpec, query: str, rows: Sequence[int] | np.ndarray
) -> Plan[np.ndarray]:
    """:meth:`EDJEClient.score_rows`: ``edje_rank_by_id``, ``query`` against rows of the bank.

    A collection's rows are the token bank's integer image ids (its input ``image_ids``).
    """
    if spec.bank_batch is None:
        raise ModelNotReadyError(f"the server has no token bank ({BY_ID_MODEL!r})")
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a str, got {type(query).__name__}")
    array = np.asarray(rows)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise InvalidInputError(
            f"rows must be a 1-D integer array, got {array.dtype} {array.shape}"
        )
    inputs = (("image_ids", array.astype(np.int64), "INT64"),)
    text = (("text", np.array([query.encode("utf-8")], dtype=object), "BYTES"),)
    calls = _split(BY_ID_MODEL, spec.bank_batch, inputs, ("scores",), shared=text)
    return Plan(calls, _scores("scores"), "pair")


def rerank_plan(
    spec: ServerSpec,
    query: str,
    documents: TokensLike,
    top_n: int | None,
    return_probabilities: bool,
    labels: Sequence[str] | None,
) -> Plan[list[RerankResult]]:
    """:meth:`EDJEClient.rerank`: the ``edje_rank`` requests of :func:`score_plan`, ranked."""
    tokens = as_tokens(documents, spec)
    check_rerank_args(query, len(tokens), top_n, labels)
    rank = partial(rank_results, top_n=top_n, probabilities=return_probabilities, labels=labels)
    return _pairs(spec, query, tokens).then(rank)


def rerank_collection_plan(
    spec: ServerSpec,
    query: str,
    collection: ImageCollection,
    ids: Sequence[str] | None,
    top_n: int | None,
    return_probabilities: bool,
    by_id: bool | None,
) -> Plan[list[RerankResult]]:
    """:meth:`EDJEClient.rerank_collection`: the images ``ids``, by row or by tokens, ranked."""
    ids, rows = collection_rows(collection, ids)
    check_rerank_args(query, len(rows), top_n, ids)
    by_rows, by_tokens = partial(score_rows_plan, spec, query), partial(score_plan, spec, query)
    plan = bank_or_tokens(collection, rows, by_id, spec.bank_holds, by_rows, by_tokens)
    rank = partial(rank_results, top_n=top_n, probabilities=return_probabilities, labels=ids)
    return plan.then(rank)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for retryable errors.

    Attempt ``k`` (0-based) that fails with a retryable error is followed by a pause drawn
    uniformly from ``[0, min(max_delay, base_delay * 2**k)]``, up to ``max_retries`` times.
    """

    max_retries: int = 2
    base_delay: float = 0.1
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or self.max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative int, got {self.max_retries!r}")

    def backoff(self, exc: BaseException, attempt: int) -> float:
        """Seconds to wait before retrying after ``attempt`` failed with ``exc``.

        Raises the :class:`EDJEError` for ``exc`` when it is not retryable or the retries are
        spent, and ``exc`` itself when it is not a known kind of error.
        """
        error = as_edje_error(exc)
        if error is None:
            raise exc
        if not error.retryable or attempt >= self.max_retries:
            if error is exc:
                raise error
            raise error from exc
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2**attempt))
