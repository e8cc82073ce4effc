"""Text -> image search: first-stage embedding search, then EDJE re-ranking.

The first stage embeds the query (``edje_text_embed``) and finds the nearest image embeddings
in an :class:`~edje_client.collection.ImageCollection` (see
:mod:`edje_client.first_stage`); EDJE (``edje_rank``) then re-scores the
top ``rerank_top_k`` candidates with the stored tokens. Candidates are never lost: re-ranked ones
come first in EDJE's order, the rest follow in first-stage order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edje_client._core import bank_or_tokens
from edje_client.collection import ImageCollection


class Scorer(Protocol):
    """What search needs from a client (``EDJEClient`` provides all of it)."""

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...

    def score(self, texts: str | list[str], tokens: np.ndarray) -> np.ndarray: ...

    def score_rows(self, query: str, rows: np.ndarray) -> np.ndarray: ...

    def bank_holds(self, collection: ImageCollection) -> bool: ...


@dataclass
class SearchHit:
    """One image: its id and row, EDJE's logit (if re-ranked), the first stage's score and
    rank, and the collection's metadata columns for it (path, caption ...)."""

    id: str
    row: int
    score: float | None
    first_stage_score: float
    first_stage_rank: int
    metadata: dict = field(default_factory=dict)


@dataclass
class SearchResponse:
    """Hits best first, and where the time went (milliseconds)."""

    query: str
    hits: list[SearchHit]
    timings_ms: dict[str, float] = field(default_factory=dict)


def rerank_order(first_stage_scores: np.ndarray, edje_scores: np.ndarray) -> np.ndarray:
    """Order of candidates (given in first-stage order): re-ranked head, then the untouched tail."""
    head = np.argsort(-edje_scores, kind="stable")
    tail = np.arange(len(edje_scores), len(first_stage_scores))
    return np.concatenate([head, tail])


def search(
    client: Scorer,
    collection: ImageCollection,
    query: str,
    k: int = 10,
    rerank_top_k: int | None = None,
    by_id: bool | None = None,
) -> SearchResponse:
    """Search ``collection`` for ``query``; return the ``k`` best hits.

    Parameters
    ----------
    k
        Number of hits returned (capped at the collection's size).
    rerank_top_k
        How many first-stage candidates EDJE re-scores (default ``k``; 0 = first stage only).
    by_id
        Send row numbers to the server's token bank instead of tokens (default: when the
        server's bank holds this collection).
    """
    rerank_top_k = k if rerank_top_k is None else rerank_top_k
    depth = max(k, rerank_top_k)
    t0 = time.perf_counter()
    query_embedding = client.embed_texts([query])
    t1 = time.perf_counter()
    first_scores, rows = collection.search(query_embedding, depth)
    first_scores, rows = first_scores[0], rows[0]
    t2 = time.perf_counter()
    n_rerank = min(rerank_top_k, len(rows))
    edje = np.zeros(0, dtype=np.float32)
    if n_rerank:
        edje = bank_or_tokens(
            collection,
            rows[:n_rerank],
            by_id,
            client.bank_holds,
            lambda head: client.score_rows(query, head),
            lambda tokens: client.score(query, tokens),
        )
    t3 = time.perf_counter()
    order = rerank_order(first_scores, edje)[:k]
    ids = collection.ids(rows[order])
    metadata = collection.metadata(rows[order])
    hits = [
        SearchHit(
            id=ids[n],
            row=int(rows[i]),
            score=float(edje[i]) if i < n_rerank else None,
            first_stage_score=float(first_scores[i]),
            first_stage_rank=int(i),
            metadata=metadata[n],
        )
        for n, i in enumerate(order)
    ]
    timings = {
        "embed_query": (t1 - t0) * 1e3,
        "first_stage": (t2 - t1) * 1e3,
        "rerank": (t3 - t2) * 1e3,
        "total": (t3 - t0) * 1e3,
    }
    return SearchResponse(query=query, hits=hits, timings_ms=timings)
