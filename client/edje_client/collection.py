"""An image collection: one Lance dataset holding EDJE tokens, first-stage embeddings and ids.

Format (``edje-collection`` version 2)
--------------------------------------
A collection is one `Lance <https://lancedb.github.io/lance/>`_ dataset, in a local directory
or at an object-store URI (``s3://``, ``gs://``, ``az://``; credentials through
``storage_options``). Its columns:

``id``
    string, unique (a duplicate is refused), with a BTREE scalar index.
``tokens``
    ``fixed_size_list<float16>[Q*D]``: the ``[Q, D]`` compressed tokens, row-major; or
    ``fixed_size_list<int8>[Q*D]`` with ``token_scales`` below (``token_dtype="int8"``).
``token_scales``
    int8 collections only: ``fixed_size_list<float32>[Q]``, one symmetric scale per token:
    ``scale = max|x| / 127``, ``q = round(x / scale)``, read back as ``q * scale``.
``embedding``
    ``fixed_size_list<float32>[E]``: the L2-normalised first-stage image embedding.
any other column
    the user's metadata (a path, a URL, a caption ...), returned with search hits.

The schema metadata key ``edje`` holds JSON: ``{"format": "edje-collection", "version": 2,
"num_tokens": Q, "token_width": D, "embedding_dim": E, "token_dtype": ..., "model_id": ...}``.
``model_id`` names the model that made the tokens (``""`` when unknown, as after a migration).

Rows
----
Rows are dense, ``0 .. len-1``, in commit order, and never change: the collection is
append-only (no deletes), and compaction keeps the order. Row numbers are the token bank's
integer image ids.

Commits and readers
-------------------
Every :meth:`ImageCollection.add` is one Lance commit: a process killed mid-append loses
nothing committed, and the interrupted batch is either wholly there or absent (at worst an
orphan data file that no version references; :meth:`ImageCollection.optimize` removes it).
Distributed writers call :func:`write_fragments` in parallel and one :meth:`commit_fragments`
publishes them all. A reader sees the version it opened; :meth:`ImageCollection.refresh` moves
it to the newest.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edje_client.collection_format import (
    ID_CHUNK,
    RESERVED_COLUMNS,
    CollectionError,
    CollectionMismatchError,
    CollectionNotFoundError,
    CollectionSpec,
    DuplicateIdError,
    check_ids,
    decode_tokens,
    lance_module,
    rows_table,
    sql_string,
    write_fragments,
)

__all__ = [
    "ImageCollection",
    "CollectionSpec",
    "CollectionError",
    "CollectionMismatchError",
    "CollectionNotFoundError",
    "DuplicateIdError",
    "rows_table",
    "write_fragments",
]


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class ImageCollection:
    """Tokens, embeddings, ids and metadata of a set of images, in one Lance dataset.

    Parameters
    ----------
    uri
        Local directory or object-store URI of the dataset.
    readonly
        Refuse writes; the dataset must exist.
    spec
        What the collection must hold. For a new collection it fixes Q, D, E, the token dtype
        and the model; for an existing one any difference is a :class:`CollectionMismatchError`
        naming it. Without it, a new collection takes its shape from the first :meth:`add`.
    storage_options
        Passed to Lance for object stores (credentials, region, endpoint).
    exact_limit
        Up to this many rows the first stage is searched exactly (see :mod:`first_stage`).

    A collection object is not thread-safe; share it between threads only with a lock.
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        readonly: bool = False,
        spec: CollectionSpec | None = None,
        storage_options: dict[str, str] | None = None,
        exact_limit: int | None = None,
    ) -> None:
        from edje_client.first_stage import EXACT_LIMIT, FirstStage

        self.uri = str(uri)
        self.readonly = readonly
        self.storage_options = storage_options
        self._dataset = self._open_existing()
        if self._dataset is None:
            if readonly:
                raise CollectionNotFoundError(
                    f"no collection at {self.uri} (fill one with `edje index`)"
                )
            self.spec = spec
        else:
            self.spec = CollectionSpec.from_schema(self._dataset.schema, self.uri)
            if spec is not None and self.spec.differences(spec):
                raise CollectionMismatchError(
                    f"collection {self.uri} does not match the expected model and shape: "
                    + "; ".join(self.spec.differences(spec))
                    + " (index into a new collection, or serve the model that made this one)"
                )
        self.first_stage = FirstStage(self, EXACT_LIMIT if exact_limit is None else exact_limit)

    # ---- opening -------------------------------------------------------------------------
    def _open_existing(self):
        lance = lance_module()
        if _is_local(self.uri):
            path = Path(self.uri.removeprefix("file://"))
            if (path / "tokens" / "meta.json").is_file():
                raise CollectionMismatchError(
                    f"{path} is a format-1 token store; convert it with "
                    f"`edje collection migrate {path} NEW_COLLECTION`"
                )
            if not (path / "_versions").is_dir():
                leftovers = {"data", "_transactions"}  # uncommitted writes, no version yet
                if path.exists() and (
                    not path.is_dir() or any(p.name not in leftovers for p in path.iterdir())
                ):
                    raise CollectionError(
                        f"{path} exists but is not a collection (no Lance dataset there); "
                        "nothing was changed"
                    )
                return None
        try:
            return lance.dataset(self.uri, storage_options=self.storage_options)
        except ValueError as exc:
            if "was not found" in str(exc):
                return None
            raise CollectionError(f"cannot open collection {self.uri}: {exc}") from exc
        except OSError as exc:
            raise CollectionError(f"cannot open collection {self.uri}: {exc}") from exc

    @property
    def dataset(self):
        """The Lance dataset at the version this object reads (``None`` before the first add)."""
        return self._dataset

    @property
    def path(self) -> Path:
        """The collection as a local path (for messages and for local-only features)."""
        return Path(self.uri.removeprefix("file://"))

    @property
    def version(self) -> int:
        """The dataset version this object reads (0 before the first commit)."""
        return 0 if self._dataset is None else self._dataset.version

    def refresh(self) -> int:
        """Move to the newest committed version; return how many rows it added."""
        before = len(self)
        if self._dataset is None:
            self._dataset = self._open_existing()
            if self._dataset is not None and self.spec is None:
                self.spec = CollectionSpec.from_schema(self._dataset.schema, self.uri)
        elif self._dataset.latest_version != self._dataset.version:
            self._dataset = self._dataset.checkout_version(self._dataset.latest_version)
        return len(self) - before

    # ---- writing -------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.readonly:
            raise CollectionError(f"collection {self.uri} was opened readonly")

    def _spec_for(self, tokens: np.ndarray, embeddings: np.ndarray) -> CollectionSpec:
        if self.spec is None:
            tokens, embeddings = np.asarray(tokens), np.asarray(embeddings)
            if tokens.ndim != 3 or embeddings.ndim != 2:
                raise ValueError(
                    f"tokens must be [N, Q, D] and embeddings [N, E]; got {tokens.shape} and "
                    f"{embeddings.shape}"
                )
            self.spec = CollectionSpec(tokens.shape[1], tokens.shape[2], embeddings.shape[1])
        return self.spec

    def add(
        self,
        ids: Sequence[str],
        tokens: np.ndarray,
        embeddings: np.ndarray,
        metadata: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """Append one batch as one atomic commit.

        Raises
        ------
        DuplicateIdError
            An id already stored, or repeated in the batch. Nothing is written.
        ValueError
            Tokens or embeddings of the wrong shape, non-finite, or out of float16 range.
        """
        self._check_writable()
        table = rows_table(self._spec_for(tokens, embeddings), ids, tokens, embeddings, metadata)
        if table.num_rows == 0:
            return
        self._refuse_existing(table.column("id").to_pylist())
        self._create(table.schema)
        self._commit(
            lambda lance: lance.write_dataset(
                table, self.uri, mode="append", storage_options=self.storage_options
            )
        )

    def commit_fragments(
        self, fragments: Sequence[Any], ids: Sequence[str], schema: Any = None
    ) -> None:
        """Publish fragments from :func:`write_fragments` (holding ``ids``) as one version.

        ``schema`` is the fragments' (the spec's, plus their metadata columns); it matters only
        when this commit creates the collection.
        """
        self._check_writable()
        if self.spec is None:
            raise CollectionError(f"collection {self.uri} has no spec yet: give spec=...")
        if not fragments:
            return
        self._refuse_existing(check_ids(ids))
        self._create(schema if schema is not None else self.spec.schema())
        version = self._dataset.version
        self._commit(
            lambda lance: lance.LanceDataset.commit(
                self.uri,
                lance.LanceOperation.Append(list(fragments)),
                read_version=version,
                storage_options=self.storage_options,
            )
        )

    def _create(self, schema: Any) -> None:
        """Create the (empty) dataset with its id index, unless it exists.

        Creation is Lance's put-if-absent: a writer that lost the race to create the same
        collection gets a clear error rather than replacing the winner's rows.
        """
        if self._dataset is not None:
            return
        lance = lance_module()
        try:
            dataset = lance.write_dataset(
                schema.empty_table(), self.uri, mode="create", storage_options=self.storage_options
            )
            dataset.create_scalar_index("id", "BTREE")
        except (OSError, ValueError, RuntimeError) as exc:
            raise CollectionError(f"cannot create collection {self.uri}: {exc}") from exc
        self._dataset = lance.dataset(self.uri, storage_options=self.storage_options)

    def _commit(self, write: Any) -> None:
        try:
            self._dataset = write(lance_module())
        except (OSError, ValueError, RuntimeError) as exc:
            raise CollectionError(f"cannot write to collection {self.uri}: {exc}") from exc

    def _refuse_existing(self, ids: list[str]) -> None:
        self.refresh()  # check against the newest version, not the one this object opened
        present = self.existing(ids)
        if present:
            first = next(i for i in ids if i in present)
            raise DuplicateIdError(
                f"id {first!r} is already in the collection {self.uri} (ids are immutable; "
                f"{len(present)} of this batch's {len(ids)} ids are present)"
            )

    # ---- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return 0 if self._dataset is None else self._dataset.count_rows()

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and bool(self.existing([image_id]))

    def existing(self, ids: Iterable[str]) -> set[str]:
        """The subset of ``ids`` already in the collection (scalar-index lookups)."""
        return set(self._lookup(list(ids)))

    def _lookup(self, ids: list[str]) -> dict[str, int]:
        """``{id: row}`` of those ``ids`` that are stored."""
        if self._dataset is None or not ids:
            return {}
        found: dict[str, int] = {}
        for s in range(0, len(ids), ID_CHUNK):
            chunk = ids[s : s + ID_CHUNK]
            flt = "id IN (" + ",".join(sql_string(i) for i in chunk) + ")"
            table = self._dataset.to_table(columns=["id"], filter=flt, with_row_address=True)
            rows = self.rows_at(table.column("_rowaddr").to_numpy())
            found.update(zip(table.column("id").to_pylist(), rows.tolist(), strict=True))
        return found

    def rows_at(self, addresses: np.ndarray) -> np.ndarray:
        """Row numbers of Lance row addresses (``fragment_id << 32 | offset_in_fragment``)."""
        starts = self._fragment_starts()
        addresses = np.asarray(addresses, dtype=np.int64)
        base = np.array([starts[int(a) >> 32] for a in addresses], dtype=np.int64)
        return base + (addresses & 0xFFFFFFFF)

    def _fragment_starts(self) -> dict[int, int]:
        """First row of each fragment, computed once per dataset version."""
        version = self._dataset.version
        if getattr(self, "_starts_version", None) != version:
            starts, total = {}, 0
            for fragment in self._dataset.get_fragments():
                starts[fragment.fragment_id] = total
                total += fragment.count_rows()
            self._starts, self._starts_version = starts, version
        return self._starts

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids``, in order; ``KeyError`` naming the first unknown id."""
        ids = list(ids)
        found = self._lookup(list(dict.fromkeys(ids)))
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"unknown id {missing[0]!r} in collection {self.uri}")
        return np.array([found[i] for i in ids], dtype=np.int64)

    def _check_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        r = np.asarray(rows)
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise ValueError(f"rows must be a 1-D integer array, got {r.dtype} {r.shape}")
        r = r.astype(np.int64, copy=False)
        n = len(self)
        if r.size and (r.min() < 0 or r.max() >= n):
            bad = int(r[(r < 0) | (r >= n)][0])
            raise IndexError(f"row {bad} out of range for a collection of {n} rows")
        return r

    def _take(self, rows: np.ndarray, columns: list[str]):
        return self._dataset.take(rows.tolist(), columns=columns)

    def ids(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """Ids of ``rows`` (all, in row order, when ``None``)."""
        if self._dataset is None:
            return []
        if rows is None:
            return self._dataset.to_table(columns=["id"]).column("id").to_pylist()
        return self._take(self._check_rows(rows), ["id"]).column("id").to_pylist()

    def tokens(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float16 ``[N, Q, D]`` tokens of ``rows`` (int8 collections are dequantised)."""
        rows = self._check_rows(rows)
        if self.spec is None or not len(rows):
            q, d = self.spec.token_shape if self.spec else (0, 0)
            return np.zeros((0, q, d), dtype=np.float16)
        columns = ["tokens"] + (["token_scales"] if self.spec.token_dtype == "int8" else [])
        return decode_tokens(self._take(rows, columns), self.spec)

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """float16 ``[N, Q, D]`` tokens of ``ids``; ``KeyError`` naming the first unknown."""
        if isinstance(ids, (str, bytes)):
            raise TypeError("ids must be a sequence of str, not a single string")
        return self.tokens(self.rows_of(ids))

    def embeddings(self, start: int = 0) -> np.ndarray:
        """float32 ``[rows - start, E]`` embeddings of rows ``start ..``, in row order."""
        if self._dataset is None:
            return np.zeros((0, self.spec.embedding_dim if self.spec else 0), np.float32)
        table = self._dataset.to_table(columns=["embedding"], offset=start)
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        return flat.reshape(table.num_rows, self.spec.embedding_dim)

    @property
    def metadata_columns(self) -> list[str]:
        """The user's columns (everything but id, tokens, scales and embedding)."""
        if self._dataset is None:
            return []
        return [n for n in self._dataset.schema.names if n not in RESERVED_COLUMNS]

    def metadata(self, rows: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """The user's columns of ``rows`` as one dict per row (empty dicts when none)."""
        rows = self._check_rows(rows)
        columns = self.metadata_columns
        if not columns or not len(rows):
            return [{} for _ in rows]
        return self._take(rows, columns).to_pylist()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """First-stage nearest neighbours by cosine: ``(scores [M, k'], rows [M, k'])``."""
        return self.first_stage.search(queries, k)

    # ---- upkeep --------------------------------------------------------------------------
    def optimize(self, remove_orphans: bool = True) -> dict[str, Any]:
        """Compact small fragments, build or refresh the vector index, drop old versions.

        ``remove_orphans`` also deletes data files no version references (what a writer
        killed mid-append leaves): run it when no other writer is active, since an
        in-flight append's files look the same until it commits.
        """
        self._check_writable()
        if self._dataset is None:
            return {"compacted_fragments": 0, "index": "none", "bytes_removed": 0}
        if not any(list(i.field_names) == ["id"] for i in self._dataset.describe_indices()):
            self._dataset.create_scalar_index("id", "BTREE")  # a writer died before making it
            self.refresh()
        self._dataset.optimize.optimize_indices()  # index every fragment: then all compact
        metrics = self._dataset.optimize.compact_files()
        self.refresh()
        index = self.first_stage.maintain_index()
        stats = self._dataset.cleanup_old_versions(
            older_than=timedelta(0), delete_unverified=remove_orphans
        )
        return {
            "compacted_fragments": metrics.fragments_removed,
            "index": index,
            "bytes_removed": stats.bytes_removed,
        }

    def size_bytes(self) -> int | None:
        """Bytes on disk (local collections only; ``None`` for object stores)."""
        if not _is_local(self.uri):
            return None
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def info(self) -> dict[str, Any]:
        """Rows, spec, model, versions, fragments, indices and size (``edje collection info``)."""
        if self._dataset is None:
            return {"uri": self.uri, "rows": 0, "version": 0}
        rows = len(self)
        size = self.size_bytes()
        return {
            "uri": self.uri,
            "rows": rows,
            **asdict(self.spec),
            "model_id": self.spec.model_id or "unknown",
            "version": self.version,
            "versions": len(self._dataset.versions()),
            "fragments": len(self._dataset.get_fragments()),
            "indices": [i.name for i in self._dataset.describe_indices()],
            "metadata_columns": self.metadata_columns,
            "size_bytes": size,
            "bytes_per_image": round(size / rows) if size is not None and rows else None,
        }

    def close(self) -> None:
        """Release the dataset handle (Lance holds no lock to free). Idempotent."""
        self._dataset = None

    def __enter__(self) -> ImageCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "writable"
        return f"ImageCollection({self.uri!r}, rows={len(self)}, spec={self.spec}, {mode})"
