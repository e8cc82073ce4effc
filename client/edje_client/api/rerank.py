"""``POST /v2/rerank`` (Cohere v2), ``/v1/rerank`` (Jina, Cohere v1) and ``/rerank``.

Stored ids are scored exactly as :meth:`EDJEClient.rerank_collection` scores them: through the
server's token bank when it holds this collection (row numbers on the wire), else with the
stored tokens. Inline images are indexed on the fly (``edje_index``) and not stored. All
documents' logits are ranked together, best first (ties keep request order);
``relevance_score`` is the sigmoid, computed in float64 and rounded to float32 (a bf16 or fp16
sigmoid would round near-certain matches to 1.0), or the float32 logit with ``raw_scores``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
from fastapi import APIRouter

from edje_client._core import bank_or_tokens, rank_results
from edje_client.api.documents import Documents
from edje_client.api.errors import ApiError
from edje_client.api.schemas import RerankRequest, RerankResponse, RerankResultItem, Usage
from edje_client.api.state import AppState, LockedCollection
from edje_client.api.system import State
from edje_client.client import EDJEClient
from edje_client.errors import InvalidInputError

router = APIRouter(tags=["rerank"])

RERANK_PATHS = {
    "/v2/rerank": "Re-rank documents (Cohere v2 shape)",
    "/v1/rerank": "Re-rank documents (Jina and Cohere v1 shape)",
    "/rerank": "Re-rank documents (vLLM / TEI path)",
}
META = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}


def score_ids(
    client: EDJEClient,
    collection: LockedCollection,
    query: str,
    ids: list[str],
    positions: Sequence[int],
) -> np.ndarray:
    """Logits of stored ``ids``; an unknown one is a 400 naming its document."""
    try:
        rows = collection.rows_of(ids)
    except KeyError:
        present = collection.existing(ids)
        n = next(i for i, image_id in enumerate(ids) if image_id not in present)
        raise ApiError(400, f"documents[{positions[n]}]: unknown id {ids[n][:200]!r}") from None
    return bank_or_tokens(
        collection,
        rows,
        None,
        client.bank_holds,
        lambda head: client.score_rows(query, head),
        lambda tokens: client.score(query, tokens),
    )


def index_images(client: EDJEClient, images: list[bytes], labels: Sequence[str]) -> np.ndarray:
    """Tokens of ``images``; a bad one is a 400 naming its label (``documents[3]``)."""
    from edje_client.cli import index_batch

    try:
        return client.index(images).tokens
    except InvalidInputError:
        pass  # find the bad image: one request per image
    _, result, failures = index_batch(client, list(zip(labels, images, strict=True)))
    if failures:
        label, message = failures[0]
        raise ApiError(400, f"{label}: not a usable image: {message}")
    return result.tokens


def rerank(state: AppState, body: RerankRequest) -> RerankResponse:
    """Score every document of ``body`` against its query and rank them."""
    limit = state.settings.max_documents
    if len(body.documents) > limit:
        raise ApiError(413, f"{len(body.documents)} documents exceed the limit of {limit}")
    docs = Documents.parse(body.documents, state.settings.max_image_bytes)
    client = state.link.client()
    logits = np.zeros(len(body.documents), dtype=np.float32)
    if docs.ids:
        scores = score_ids(client, state.collection, body.query, docs.ids, docs.id_positions)
        logits[docs.id_positions] = scores
        state.metrics.documents.labels("id").inc(len(docs.ids))
    if docs.images:
        labels = [f"documents[{n}]" for n in docs.image_positions]
        tokens = index_images(client, docs.images, labels)
        logits[docs.image_positions] = client.score(body.query, tokens)
        state.metrics.documents.labels("image").inc(len(docs.images))
    ranked = rank_results(logits, body.top_n, not body.raw_scores, None)
    results = [
        RerankResultItem(
            index=r.index,
            relevance_score=r.score,
            document=docs.echo[r.index] if body.return_documents else None,
        )
        for r in ranked
    ]
    return RerankResponse(
        id=str(uuid.uuid4()),
        model=state.settings.model_name,
        results=results,
        usage=Usage(documents=len(body.documents), images_indexed=len(docs.images)),
        meta=META,
    )


def _endpoint(body: RerankRequest, state: State) -> RerankResponse:
    return rerank(state, body)


for _path, _summary in RERANK_PATHS.items():
    router.add_api_route(
        _path,
        _endpoint,
        methods=["POST"],
        response_model=RerankResponse,
        response_model_exclude_none=True,
        summary=_summary,
        operation_id="rerank" + _path.replace("/", "_"),
    )
