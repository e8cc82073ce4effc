"""What the client's calls return."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["IndexResult", "RerankResult"]


@dataclass(frozen=True)
class IndexResult:
    """Outputs of :meth:`EDJEClient.index`, one row per input image, in input order.

    Attributes
    ----------
    tokens
        Compressed image tokens, float16 ``[N, Q, D]`` (what :meth:`EDJEClient.score` takes).
    embeddings
        Image embeddings for first-stage search, float32 ``[N, E]``.
    """

    tokens: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class RerankResult:
    """One re-ranked document (like Cohere's and TEI's ``{index, relevance_score}``).

    Attributes
    ----------
    index
        Position of the document in the ``documents`` given to :meth:`EDJEClient.rerank`.
    score
        The raw matching logit, or its sigmoid when probabilities were asked for.
    id
        The document's id when ids were given (e.g. a collection id), else ``None``.
    """

    index: int
    score: float
    id: str | None = None
