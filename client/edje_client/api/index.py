"""``POST /v1/index``: add images to the collection, with an answer per image.

Two bodies: multipart (``files``, one part per image; ``ids``, optional, one per file, else
each file's name is its id) or JSON ``{"images": [{"id": ..., "image": base64}]}``. Each image
succeeds or fails alone: invalid base64, an empty or oversized file, an id already stored or
repeated, or an image the server cannot decode is that item's error and the others are stored,
in one commit. Uploaded images are indexed, not kept: ``/v1/images/{id}`` has no file for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from edje_client.api.documents import check_id, decode_image
from edje_client.api.errors import ApiError
from edje_client.api.schemas import IndexItem, IndexRequest, IndexResponse
from edje_client.api.state import AppState
from edje_client.api.system import State

router = APIRouter(tags=["index"])

MAX_FIELD_BYTES = 64 * 1024

REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "ids": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["files"],
            }
        },
        "application/json": {"schema": {"$ref": "#/components/schemas/IndexRequest"}},
    },
}


@dataclass
class Item:
    """One image of the request: its id and bytes, or why it cannot be stored."""

    id: str
    data: bytes | None = None
    error: str | None = None


def _checked(position: int, image_id: str, decode) -> Item:
    try:
        check_id(image_id, f"images[{position}]")
        return Item(image_id, decode())
    except ApiError as err:
        return Item(image_id, error=err.detail)


async def _multipart_items(request: Request, state: AppState) -> list[Item]:
    limit, max_bytes = state.settings.max_documents, state.settings.max_image_bytes
    async with request.form(
        max_files=limit, max_fields=limit + 1, max_part_size=MAX_FIELD_BYTES
    ) as form:
        files = form.getlist("files")
        ids = [str(i) for i in form.getlist("ids")]
        if not files:
            raise ApiError(422, 'a multipart request needs "files" parts, one per image')
        if ids and len(ids) != len(files):
            raise ApiError(422, f"got {len(ids)} ids for {len(files)} files")
        items = []
        for n, part in enumerate(files):
            if not isinstance(part, UploadFile):
                items.append(Item(ids[n] if ids else "", error=f"images[{n}]: not a file"))
                continue
            data = await part.read(max_bytes + 1)
            image_id = ids[n] if ids else (part.filename or "")

            def read(data: bytes = data, n: int = n) -> bytes:
                if not data:
                    raise ApiError(400, f"images[{n}]: the file is empty")
                if len(data) > max_bytes:
                    raise ApiError(413, f"images[{n}]: larger than the limit of {max_bytes} bytes")
                return data

            items.append(_checked(n, image_id, read))
        return items


def _json_items(body: bytes, state: AppState) -> list[Item]:
    try:
        request = IndexRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
    max_bytes = state.settings.max_image_bytes
    return [
        _checked(
            n,
            image.id,
            lambda image=image, n=n: decode_image(image.image, f"images[{n}]", max_bytes),
        )
        for n, image in enumerate(request.images)
    ]


def store(state: AppState, items: list[Item]) -> IndexResponse:
    """Index the good items and commit them; every item gets its answer."""
    from edje_client.cli import index_batch

    seen: set[str] = set()
    for item in items:
        if item.error is None and item.id in seen:
            item.error = f"id {item.id[:200]!r} appears more than once in this request"
        seen.add(item.id)
    client = state.link.client()
    with state.index_lock:
        todo = [i for i in items if i.error is None]
        stored = state.collection.existing([i.id for i in todo])
        for item in todo:
            if item.id in stored:
                item.error = f"id {item.id[:200]!r} is already in the collection"
        todo = [i for i in todo if i.error is None]
        ids, result, failures = (
            index_batch(client, [(i.id, i.data) for i in todo]) if todo else ([], None, [])
        )
        failed = dict(failures)
        for item in todo:
            if item.id in failed:
                item.error = f"not a usable image: {failed[item.id]}"
        if ids:
            with state.collection.locked() as collection:
                collection.add(ids, result.tokens, result.embeddings)
                collection.first_stage.maintain_index()
    answers = [
        IndexItem(index=n, id=i.id, status="error" if i.error else "indexed", error=i.error)
        for n, i in enumerate(items)
    ]
    return IndexResponse(
        indexed=len(ids), failed=len(items) - len(ids), rows=len(state.collection), results=answers
    )


@router.post(
    "/v1/index",
    response_model=IndexResponse,
    response_model_exclude_none=True,
    summary="Add images to the collection",
    openapi_extra={"requestBody": REQUEST_BODY},
)
async def index_route(request: Request, state: State) -> IndexResponse:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        items = await _multipart_items(request, state)
    elif kind == "application/json":
        items = await run_in_threadpool(_json_items, await request.body(), state)
    else:
        raise ApiError(415, "send multipart/form-data (files, ids) or application/json (images)")
    limit = state.settings.max_documents
    if len(items) > limit:
        raise ApiError(413, f"{len(items)} images exceed the limit of {limit} per request")
    return await run_in_threadpool(store, state, items)
