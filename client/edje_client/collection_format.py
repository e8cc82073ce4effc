"""The collection format: its schema, shape contract, errors, and batch encoding.

See :mod:`edje_client.collection` for the format's description (columns, schema metadata,
rows). This module needs only numpy and pyarrow, and Lance only to write fragments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edje_client.errors import EDJEError

FORMAT_NAME = "edje-collection"
FORMAT_VERSION = 2
METADATA_KEY = "edje"
TOKEN_DTYPES = ("float16", "int8")
RESERVED_COLUMNS = ("id", "tokens", "token_scales", "embedding")
ID_CHUNK = 512  # ids per scalar-index lookup
_FP16_MAX = float(np.finfo(np.float16).max)


class CollectionError(EDJEError):
    """A collection cannot be opened, read or written (names the URI and the problem)."""


class CollectionNotFoundError(CollectionError, FileNotFoundError):
    """No collection at the URI (and none may be created there)."""


class CollectionMismatchError(CollectionError):
    """The collection's Q, D, E, token dtype or model differ from what was expected."""


class DuplicateIdError(CollectionError, ValueError):
    """An id is already in the collection, or appears twice in one batch."""


def lance_module():
    try:
        import lance
    except ImportError as exc:  # pragma: no cover - pylance is a dependency
        raise ImportError("collections need Lance: pip install pylance") from exc
    return lance


def _pa():
    import pyarrow

    return pyarrow


@dataclass(frozen=True)
class CollectionSpec:
    """The shape contract of a collection: what its tokens and embeddings are.

    ``model_id`` is the identity of the model that produced them (the server's manifest);
    ``""`` means unknown and matches any model.
    """

    num_tokens: int
    token_width: int
    embedding_dim: int
    token_dtype: str = "float16"
    model_id: str = ""

    def __post_init__(self) -> None:
        for name in ("num_tokens", "token_width", "embedding_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")

    @property
    def token_shape(self) -> tuple[int, int]:
        """``(Q, D)``."""
        return (self.num_tokens, self.token_width)

    @property
    def bytes_per_image(self) -> int:
        """Bytes of tokens and embedding per row, before Lance's own (small) overhead."""
        q, d = self.token_shape
        tokens = q * d * 2 if self.token_dtype == "float16" else q * d + 4 * q
        return tokens + 4 * self.embedding_dim

    def differences(self, other: CollectionSpec) -> list[str]:
        """What differs between ``self`` (the collection) and ``other`` (the expectation).

        The token dtype is the collection's storage choice, not part of the contract.
        """
        out = [
            f"{name} {getattr(self, name)} != {getattr(other, name)}"
            for name in ("num_tokens", "token_width", "embedding_dim")
            if getattr(self, name) != getattr(other, name)
        ]
        if self.model_id and other.model_id and self.model_id != other.model_id:
            out.append(f"model {self.model_id!r} != {other.model_id!r}")
        return out

    def schema(self, extra: Any = None):
        """The Arrow schema of a collection with this spec (plus ``extra`` user fields)."""
        pa = _pa()
        q, d = self.token_shape
        token_type = pa.float16() if self.token_dtype == "float16" else pa.int8()
        fields = [
            pa.field("id", pa.string(), nullable=False),
            pa.field("tokens", pa.list_(token_type, q * d), nullable=False),
        ]
        if self.token_dtype == "int8":
            fields.append(pa.field("token_scales", pa.list_(pa.float32(), q), nullable=False))
        fields.append(pa.field("embedding", pa.list_(pa.float32(), self.embedding_dim)))
        fields += [f for f in (extra or []) if f.name not in RESERVED_COLUMNS]
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(self)}
        return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})

    @classmethod
    def from_schema(cls, schema, where: str) -> CollectionSpec:
        """Read the spec from a dataset's schema; a foreign dataset is a clear error."""
        raw = (schema.metadata or {}).get(METADATA_KEY.encode())
        if raw is None:
            raise CollectionMismatchError(
                f"{where} is a Lance dataset but not an EDJE collection (no {METADATA_KEY!r} "
                f"schema metadata; columns: {', '.join(schema.names)})"
            )
        try:
            meta = json.loads(raw)
            if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
            return cls(
                num_tokens=meta["num_tokens"],
                token_width=meta["token_width"],
                embedding_dim=meta["embedding_dim"],
                token_dtype=meta["token_dtype"],
                model_id=meta.get("model_id", ""),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CollectionMismatchError(
                f"{where}: unreadable EDJE collection metadata ({exc}); this code reads "
                f"{FORMAT_NAME} version {FORMAT_VERSION}"
            ) from None


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def check_ids(ids: Sequence[str]) -> list[str]:
    """``ids`` as a list of distinct, non-empty strings; a clear error otherwise."""
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be a sequence of str, not a single string")
    out = list(ids)
    seen: set[str] = set()
    for i in out:
        if not isinstance(i, str):
            raise ValueError(f"ids must be str, got {type(i).__name__}: {i!r}")
        if not i:
            raise ValueError("ids must be non-empty strings")
        if i in seen:
            raise DuplicateIdError(f"id {i!r} appears more than once in this batch")
        seen.add(i)
    return out


def rows_table(
    spec: CollectionSpec,
    ids: Sequence[str],
    tokens: np.ndarray,
    embeddings: np.ndarray,
    metadata: Mapping[str, Sequence[Any]] | None = None,
):
    """Validate one batch and encode it as an Arrow table of the collection's schema.

    Raises ``ValueError`` naming the first problem; nothing is written by this function.
    """
    pa = _pa()
    ids = check_ids(ids)
    n = len(ids)
    q, d = spec.token_shape
    tokens = np.asarray(tokens)
    if tokens.ndim != 3 or tokens.shape[0] != n or tokens.shape[1:] != (q, d):
        raise ValueError(f"tokens must be [{n}, {q}, {d}] for {n} ids, got {tokens.shape}")
    if tokens.dtype.kind != "f":
        raise ValueError(f"tokens must be a float array, got dtype {tokens.dtype}")
    finite = np.isfinite(tokens).reshape(n, q * d).all(axis=1)
    if not finite.all():
        raise ValueError(f"tokens for id {ids[int(np.argmin(finite))]!r} contain NaN or Inf")
    if tokens.dtype.itemsize > 2 and n and np.abs(tokens).max() > _FP16_MAX:
        raise ValueError(f"tokens exceed the float16 range (|x| > {_FP16_MAX})")
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.shape != (n, spec.embedding_dim):
        raise ValueError(
            f"embeddings must be [{n}, {spec.embedding_dim}] for {n} ids, got {embeddings.shape}"
        )
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings hold NaN or Inf")

    def fixed(values: np.ndarray, width: int):
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)

    columns: dict[str, Any] = {"id": pa.array(ids, pa.string())}
    if spec.token_dtype == "float16":
        columns["tokens"] = fixed(np.ascontiguousarray(tokens, dtype=np.float16), q * d)
    else:
        quantised, scales = quantise_int8(tokens)
        columns["tokens"] = fixed(quantised, q * d)
        columns["token_scales"] = fixed(scales, q)
    columns["embedding"] = fixed(embeddings, spec.embedding_dim)
    for name, values in (metadata or {}).items():
        if name in RESERVED_COLUMNS:
            raise ValueError(f"metadata column {name!r} is reserved")
        values = list(values)
        if len(values) != n:
            raise ValueError(f"metadata column {name!r} has {len(values)} values for {n} ids")
        columns[name] = pa.array(values)
    table = pa.table(columns)
    extra = [table.schema.field(name) for name in (metadata or {})]
    return table.cast(spec.schema(extra))


def quantise_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: ``(q [N, Q, D] int8, scale [N, Q] float32)``."""
    x = np.asarray(tokens, dtype=np.float32)
    scale = np.abs(x).max(axis=2) / 127.0
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.clip(np.rint(x / safe), -127, 127).astype(np.int8), scale.astype(np.float32)


def decode_tokens(table, spec: CollectionSpec) -> np.ndarray:
    """float16 ``[N, Q, D]`` from an Arrow table holding the ``tokens`` (and scales) columns."""
    q, d = spec.token_shape
    n = table.num_rows
    flat = table.column("tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if spec.token_dtype == "float16":
        return flat.astype(np.float16, copy=False).reshape(n, q, d)
    scales = table.column("token_scales").combine_chunks().flatten().to_numpy()
    values = flat.reshape(n, q, d).astype(np.float32) * scales.reshape(n, q, 1)
    return values.astype(np.float16)


def write_fragments(
    uri: str | Path, table, storage_options: dict[str, str] | None = None, mode: str = "append"
) -> list[Any]:
    """Write a batch's data files under ``uri`` without committing; return their fragments.

    The distributed writer's half of an append: many workers call this in parallel, and one
    :meth:`ImageCollection.commit_fragments` publishes everything they wrote as one version.
    ``mode="create"`` only says that no dataset exists there yet (it keeps Lance quiet).
    """
    from lance.fragment import write_fragments as lance_write

    try:
        return lance_write(
            table, str(uri), schema=table.schema, mode=mode, storage_options=storage_options
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CollectionError(f"cannot write to {uri}: {exc}") from exc
