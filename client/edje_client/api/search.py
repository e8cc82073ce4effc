"""``POST /v1/search``: :func:`edje_client.search.search` over HTTP.

Hits carry the collection's metadata columns except ``path``: a file path on the server is not
the client's business, so a hit whose image is stored gets an ``image_url``
(``/v1/images/{id}``) instead.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter

from edje_client._core import sigmoid
from edje_client.api.errors import ApiError
from edje_client.api.schemas import SearchHit, SearchRequest, SearchResponse
from edje_client.api.system import State
from edje_client.search import search

router = APIRouter(tags=["search"])

PATH_COLUMN = "path"


def image_url(image_id: str) -> str:
    return "/v1/images/" + quote(image_id, safe="")


def _hit(rank: int, hit: Any) -> SearchHit:
    metadata = dict(hit.metadata)
    path = metadata.pop(PATH_COLUMN, None)
    score = hit.score
    return SearchHit(
        id=hit.id,
        rank=rank,
        score=score,
        relevance_score=None if score is None else float(sigmoid(np.float32(score))),
        first_stage_score=hit.first_stage_score,
        first_stage_rank=hit.first_stage_rank,
        image_url=image_url(hit.id) if path else None,
        metadata=metadata,
    )


def _matches(metadata: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(metadata.get(column) == value for column, value in wanted.items())


@router.post("/v1/search", response_model=SearchResponse, summary="Search the collection")
def search_route(body: SearchRequest, state: State) -> SearchResponse:
    limit = state.settings.max_documents
    depth = max(body.k, body.rerank_top_k or 0)
    if depth > limit:
        raise ApiError(413, f"k and rerank_top_k are at most {limit}, got {depth}")
    collection = state.collection
    if body.filter:
        unknown = sorted(set(body.filter) - (set(collection.metadata_columns) - {PATH_COLUMN}))
        if unknown:
            raise ApiError(400, f"filter names unknown metadata columns: {unknown[:5]}")
    client = state.link.client()
    if not len(collection):
        return SearchResponse(query=body.query, hits=[], timings_ms={})
    start = time.perf_counter()
    response = search(client, collection, body.query, body.k, body.rerank_top_k)
    hits = [h for h in response.hits if not body.filter or _matches(h.metadata, body.filter)]
    timings = {**response.timings_ms, "api_total": (time.perf_counter() - start) * 1e3}
    state.metrics.documents.labels("id").inc(sum(h.score is not None for h in response.hits))
    return SearchResponse(
        query=body.query,
        hits=[_hit(rank, hit) for rank, hit in enumerate(hits)],
        timings_ms=timings,
    )
