"""``GET /v1/images/{id}``: a stored image, or its thumbnail with ``?size=N``.

The id is looked up in the collection and the file is the one its ``path`` column names; no
file path is ever built from the request. Unknown ids, rows without a path, and paths whose
file is gone are all 404.
"""

from __future__ import annotations

import io
import mimetypes
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from PIL import Image, ImageOps

from edje_client.api.documents import check_id
from edje_client.api.errors import ApiError
from edje_client.api.search import PATH_COLUMN
from edje_client.api.state import AppState
from edje_client.api.system import State

router = APIRouter(tags=["images"])

MAX_THUMBNAIL_PIXELS = 50_000_000
HEADERS = {
    "Cache-Control": "private, max-age=3600",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'",
}


def stored_path(state: AppState, image_id: str) -> Path:
    """The file of ``image_id``, from the collection's ``path`` column; 404 when there is none."""
    check_id(image_id, "image id")
    with state.collection.locked() as collection:
        if PATH_COLUMN not in collection.metadata_columns:
            raise ApiError(404, "this collection keeps no image files")
        try:
            rows = collection.rows_of([image_id])
        except KeyError:
            raise ApiError(404, "unknown image id") from None
        (metadata,) = collection.metadata(rows)
    path = metadata.get(PATH_COLUMN)
    if not path or not Path(path).is_file():
        raise ApiError(404, "no stored image file for this id")
    return Path(path)


def thumbnail(path: Path, size: int) -> bytes:
    """A JPEG at most ``size`` pixels on its longer side (EXIF orientation applied)."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_THUMBNAIL_PIXELS:  # checked before decoding
                raise ApiError(422, "the stored image is too large to thumbnail")
            image.draft("RGB", (size, size))
            small = ImageOps.exif_transpose(image)
            small.thumbnail((size, size))
            buf = io.BytesIO()
            small.convert("RGB").save(buf, "JPEG", quality=85)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(422, "the stored image cannot be decoded") from None
    return buf.getvalue()


@router.get("/v1/images/{image_id:path}", summary="A stored image or its thumbnail")
def image_route(
    image_id: str,
    state: State,
    size: Annotated[
        int | None, Query(ge=16, le=2048, description="thumbnail's longer side")
    ] = None,
) -> Response:
    path = stored_path(state, image_id)
    if size is not None:
        return Response(thumbnail(path, size), media_type="image/jpeg", headers=HEADERS)
    kind = mimetypes.guess_type(path.name)[0] or ""
    kind = (
        kind
        if kind.startswith("image/") and kind != "image/svg+xml"
        else "application/octet-stream"
    )
    return FileResponse(path, media_type=kind, headers=HEADERS)
