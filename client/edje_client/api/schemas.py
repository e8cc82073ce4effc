"""Request and response bodies of the HTTP API (pydantic), in the rerank ecosystem's shapes.

Re-rank requests follow Cohere v2 (``{model, query, documents, top_n, max_tokens_per_doc}``),
Cohere v1 and Jina (``return_documents``; documents as objects), and TEI / infinity
(``raw_scores``). Fields other clients send that EDJE has no use for (Cohere's ``priority``,
``relevant_spans``) are accepted and ignored; fields it knows are strictly typed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

Scalar = StrictStr | StrictInt | float | StrictBool


class DocumentObject(BaseModel):
    """One document as an object: a stored image by ``id``, or an ``image`` (base64 or data URI)."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | None = None
    image: StrictStr | None = None
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> DocumentObject:
        if (self.id is None) == (self.image is None):
            if self.text is not None and self.id is None and self.image is None:
                raise ValueError(
                    "text documents are not supported: EDJE ranks images; give "
                    '{"id": ...} for a stored image or {"image": base64} for a new one'
                )
            raise ValueError('a document object needs exactly one of "id" or "image"')
        return self


class RerankRequest(BaseModel):
    """``POST /v2/rerank``, ``/v1/rerank`` and ``/rerank``.

    Each document is a collection id (a string, or ``{"id": ...}``), an image
    (``{"image": base64 or data URI}``), or a string that is a ``data:image/...`` URI.
    """

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "edje", "query": "a red car", "documents": ["a.jpg", "b.jpg"]}]
        },
    )

    model: StrictStr | None = None
    query: StrictStr = Field(min_length=1)
    documents: list[StrictStr | DocumentObject] = Field(min_length=1)
    top_n: StrictInt | None = Field(default=None, gt=0)
    return_documents: StrictBool = False
    raw_scores: StrictBool = False
    max_tokens_per_doc: StrictInt | None = Field(
        default=None, gt=0, description="accepted for Cohere compatibility; images are not cut"
    )


class RerankResultItem(BaseModel):
    index: int = Field(description="position of the document in the request")
    relevance_score: float = Field(description="sigmoid of EDJE's logit, or the logit itself")
    document: dict[str, str] | None = None


class Usage(BaseModel):
    documents: int
    images_indexed: int = 0
    search_units: int = 1


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResultItem]
    usage: Usage
    meta: dict[str, Any] | None = None


class SearchRequest(BaseModel):
    """``POST /v1/search``: first-stage search of the collection, then EDJE re-ranking."""

    model_config = ConfigDict(extra="ignore")

    query: StrictStr = Field(min_length=1)
    k: StrictInt = Field(default=10, gt=0)
    rerank_top_k: StrictInt | None = Field(
        default=None, ge=0, description="candidates EDJE re-scores (default k; 0: first stage only)"
    )
    filter: dict[StrictStr, Scalar | None] | None = Field(
        default=None,
        description="keep only hits whose metadata columns equal these values (applied to the "
        "ranked hits, so fewer than k may come back)",
    )


class SearchHit(BaseModel):
    id: str
    rank: int
    score: float | None = Field(description="EDJE's logit (None: not re-ranked)")
    relevance_score: float | None = Field(description="sigmoid of score")
    first_stage_score: float
    first_stage_rank: int
    image_url: str | None = None
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    query: str
    hits: list[SearchHit]
    timings_ms: dict[str, float]


class IndexImage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: StrictStr
    image: StrictStr


class IndexRequest(BaseModel):
    """``POST /v1/index`` as JSON (the alternative is multipart: ``files`` and ``ids``)."""

    model_config = ConfigDict(extra="ignore")

    images: list[IndexImage] = Field(min_length=1)


class IndexItem(BaseModel):
    index: int
    id: str
    status: str = Field(description='"indexed" or "error"')
    error: str | None = None


class IndexResponse(BaseModel):
    indexed: int
    failed: int
    rows: int = Field(description="rows in the collection after this request")
    results: list[IndexItem]
