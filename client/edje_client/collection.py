"""An image collection on disk: EDJE tokens, first-stage embeddings and their ANN index.

Layout of a collection directory::

    tokens/          TokenStore: ids and [Q, D] tokens (the commit point)
    embeddings.f32   float32 [rows, E], row r belongs to the store's row r
    embeddings.json  {"dim": E}
    ann.faiss        FAISS index over the embeddings (a cache, rebuilt when stale)

Consistency: :meth:`ImageCollection.add` writes and fsyncs the embeddings *before* the token
store commits the batch, so every committed row has its embedding. Rows past the store's count
(a batch that crashed before its commit) are ignored and later overwritten. The ANN index is
derived data: on open it is used only if it holds exactly the committed rows, else rebuilt.

FAISS is the ANN library: exact inner-product search (``IndexFlatIP``) up to ``exact_limit``
images, HNSW beyond; embeddings are L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edje_client.store import TokenStore

EXACT_LIMIT = 200_000
HNSW_NEIGHBOURS = 32


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("the first-stage search needs faiss: pip install faiss-cpu") from exc
    return faiss


class ImageCollection:
    """Tokens, embeddings and an ANN index for one set of images, kept in agreement.

    Parameters
    ----------
    path
        Collection directory (created if missing unless ``readonly``).
    readonly
        Open without the writer's lock (any number of readers).
    exact_limit
        Up to this many images the search is exact; above it, HNSW.
    """

    def __init__(
        self, path: str | Path, readonly: bool = False, exact_limit: int = EXACT_LIMIT
    ) -> None:
        self.path = Path(path)
        if readonly and not (self.path / "tokens").is_dir():
            raise FileNotFoundError(f"no store at {self.path} (fill one with `edje index`)")
        self.path.mkdir(parents=True, exist_ok=True)
        self.store = TokenStore(self.path / "tokens", readonly=readonly)
        self.exact_limit = exact_limit
        meta = self.path / "embeddings.json"
        self.dim: int | None = json.loads(meta.read_text())["dim"] if meta.exists() else None
        self._index = None

    # ---- writing -------------------------------------------------------------------------
    def add(self, ids: Sequence[str], tokens: np.ndarray, embeddings: np.ndarray) -> None:
        """Append images atomically: embeddings first (fsynced), then the token commit."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(ids):
            raise ValueError(
                f"embeddings must be [N, E] with N = {len(ids)} ids; got {embeddings.shape}"
            )
        if not np.isfinite(embeddings).all():
            raise ValueError("embeddings hold NaN or Inf")
        if self.dim is None:
            self.dim = embeddings.shape[1]
            tmp = self.path / "embeddings.json.tmp"
            tmp.write_text(json.dumps({"dim": self.dim}))
            os.replace(tmp, self.path / "embeddings.json")
        elif embeddings.shape[1] != self.dim:
            raise ValueError(f"embedding width {embeddings.shape[1]} != collection's {self.dim}")
        first = len(self.store)
        fd = os.open(self.path / "embeddings.f32", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, embeddings.tobytes(), first * self.dim * 4)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.store.put(ids, tokens)  # the commit point
        if self._index is not None:
            self._index.add(embeddings)

    # ---- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.store)

    def embeddings(self) -> np.ndarray:
        """float32 [rows, E] of the committed rows (memory-mapped)."""
        rows = len(self.store)
        if rows == 0 or self.dim is None:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        data = np.memmap(self.path / "embeddings.f32", dtype=np.float32, mode="r")
        return data[: rows * self.dim].reshape(rows, self.dim)

    def ids(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """String ids of store rows."""
        return self.store.ids_at(rows)

    def tokens(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float16 [N, Q, D] tokens of store rows."""
        return self.store.get_rows(np.asarray(rows, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours by cosine: (scores [M, k'], rows [M, k']), k' = min(k, rows).

        Raises
        ------
        LookupError
            If the collection is empty.
        """
        if len(self) == 0:
            raise LookupError(f"the collection at {self.path} is empty: index some images first")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query width {queries.shape[1]} != collection's {self.dim}")
        k = min(int(k), len(self))
        index = self.ann_index()
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = max(64, 2 * k)
        scores, rows = index.search(queries, k)
        return scores, rows

    def ann_index(self):
        """The FAISS index over the committed embeddings (loaded, or rebuilt if stale)."""
        faiss = _faiss()
        rows = len(self.store)
        if self._index is not None and self._index.ntotal == rows:
            return self._index
        path = self.path / "ann.faiss"
        index = faiss.read_index(str(path)) if path.exists() else None
        if index is None or index.ntotal != rows:
            if rows <= self.exact_limit:
                index = faiss.IndexFlatIP(self.dim)
            else:
                index = faiss.IndexHNSWFlat(self.dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            index.add(np.ascontiguousarray(self.embeddings()))
        self._index = index
        return index

    def save_index(self) -> None:
        """Persist the ANN index atomically (it can always be rebuilt from the embeddings)."""
        if self._index is None or self.store.readonly:
            return
        faiss = _faiss()
        tmp = self.path / "ann.faiss.tmp"
        faiss.write_index(self._index, str(tmp))
        os.replace(tmp, self.path / "ann.faiss")

    def close(self) -> None:
        """Persist the index and release the store."""
        self.save_index()
        self.store.close()

    def __enter__(self) -> ImageCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
