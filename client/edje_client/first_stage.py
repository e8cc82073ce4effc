"""The first stage of search: cosine nearest neighbours over a collection's embeddings.

One rule decides how a collection is searched and when its vector index is built:

* up to ``exact_limit`` rows (default 100,000) the search is **exact**: the embeddings are read
  once into memory (``E x 4`` bytes per image), picked up incrementally as rows are committed,
  and scored with one matrix product per query batch;
* above it, Lance's **IVF_HNSW_SQ** vector index on the ``embedding`` column answers, with a
  refine step that re-scores candidates exactly. :meth:`FirstStage.maintain_index` (called by
  ``edje collection optimize`` and at the end of ``edje index``) builds the index once the
  collection passes the limit and refreshes it when more than a tenth of the rows are not yet
  indexed; Lance searches unindexed rows exactly in the meantime, so results stay complete.

docs/collections.md has the recall and latency measurements behind these choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edje_client.collection import ImageCollection

EXACT_LIMIT = 100_000
REFRESH_FRACTION = 0.1
INDEX_TYPE = "IVF_HNSW_SQ"
NPROBES = 16
REFINE_FACTOR = 5


def index_action(rows: int, indexed_rows: int | None, exact_limit: int) -> str:
    """What the vector index needs: ``"none"``, ``"build"``, ``"refresh"`` or ``"current"``.

    ``indexed_rows`` is ``None`` when there is no index.
    """
    if rows <= exact_limit:
        return "none"
    if indexed_rows is None:
        return "build"
    return "refresh" if rows - indexed_rows > REFRESH_FRACTION * rows else "current"


def num_partitions(rows: int) -> int:
    """IVF partitions for ``rows`` vectors (about the square root, at least one)."""
    return max(1, int(round(np.sqrt(rows))))


class FirstStage:
    """Exact or indexed cosine search over one collection (see the module docstring)."""

    def __init__(self, collection: ImageCollection, exact_limit: int = EXACT_LIMIT) -> None:
        self.collection = collection
        self.exact_limit = exact_limit
        self._embeddings: np.ndarray | None = None

    # ---- index upkeep --------------------------------------------------------------------
    def _vector_index(self):
        dataset = self.collection.dataset
        if dataset is None:
            return None
        return next(
            (i for i in dataset.describe_indices() if list(i.field_names) == ["embedding"]), None
        )

    def indexed_rows(self) -> int | None:
        """Rows the vector index covers (``None`` without one)."""
        index = self._vector_index()
        return None if index is None else int(index.num_rows_indexed)

    def maintain_index(self) -> str:
        """Build or refresh the vector index as :func:`index_action` says; return the action."""
        rows = len(self.collection)
        action = index_action(rows, self.indexed_rows(), self.exact_limit)
        dataset = self.collection.dataset
        if action == "build":
            dataset.create_index(
                "embedding",
                index_type=INDEX_TYPE,
                metric="cosine",
                num_partitions=num_partitions(rows),
            )
        elif action == "refresh":
            dataset.optimize.optimize_indices()
        if action in ("build", "refresh"):
            self.collection.refresh()
        return action

    # ---- search --------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [M, k'], rows [M, k'])`` best first, ``k' = min(k, rows)``.

        Raises ``LookupError`` for an empty collection, ``ValueError`` for a query of the
        wrong width.
        """
        collection = self.collection
        rows = len(collection)
        if rows == 0:
            raise LookupError(f"the collection {collection.uri} is empty: index some images first")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != collection.spec.embedding_dim:
            raise ValueError(
                f"query width {queries.shape[-1]} != the collection's "
                f"{collection.spec.embedding_dim}"
            )
        k = min(int(k), rows)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if rows > self.exact_limit and self._vector_index() is not None:
            return self._indexed(queries, k)
        return self._exact(queries, k)

    def embeddings(self) -> np.ndarray:
        """All committed embeddings, read once and extended as rows are committed."""
        rows = len(self.collection)
        cached = self._embeddings
        have = 0 if cached is None else len(cached)
        if have < rows:
            new = self.collection.embeddings(start=have)
            self._embeddings = new if cached is None else np.concatenate([cached, new])
        return self._embeddings[:rows]

    def _exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ self.embeddings().T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        picked = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-picked, axis=1, kind="stable")
        return np.take_along_axis(picked, order, axis=1), np.take_along_axis(top, order, axis=1)

    def _indexed(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dataset = self.collection.dataset
        scores = np.empty((len(queries), k), dtype=np.float32)
        rows = np.empty((len(queries), k), dtype=np.int64)
        for n, query in enumerate(queries):
            table = dataset.to_table(
                nearest={
                    "column": "embedding",
                    "q": query,
                    "k": k,
                    "nprobes": NPROBES,
                    "refine_factor": REFINE_FACTOR,
                },
                columns=["_distance"],
                with_row_address=True,
                disable_scoring_autoprojection=True,
            )
            found = self.collection.rows_at(table.column("_rowaddr").to_numpy())
            distance = table.column("_distance").to_numpy()
            m = len(found)
            rows[n, :m], scores[n, :m] = found, 1.0 - distance
            rows[n, m:], scores[n, m:] = -1, -np.inf
        return scores, rows
