"""Documents of a request: stored ids and inline images (base64 or ``data:`` URIs).

Images are never fetched from URLs: the API makes no outbound requests on a client's behalf.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from edje_client.api.errors import ApiError
from edje_client.api.schemas import DocumentObject

MAX_ID_CHARS = 1024
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def decode_image(value: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image or ``data:image/...;base64,`` URI; an :class:`ApiError`
    (400 for a malformed value, 413 for one over ``max_bytes``) naming ``where`` otherwise."""
    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: a data URI must be data:image/...;base64,<data>")
        mime = header[5 : -len(";base64")].split(";")[0]
        if mime and not mime.startswith("image/"):
            raise ApiError(400, f"{where}: a data URI of type {mime[:40]!r} is not an image")
    elif text.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: image URLs are not fetched; send the image as base64")
    text = "".join(text.split())
    if len(text) // 4 * 3 > max_bytes:
        raise ApiError(413, f"{where}: the image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: invalid base64") from None
    if not data:
        raise ApiError(400, f"{where}: the image is empty")
    if len(data) > max_bytes:
        raise ApiError(413, f"{where}: the image is larger than the limit of {max_bytes} bytes")
    return data


def check_id(value: str, where: str) -> str:
    """A usable collection id: non-empty, bounded, free of control characters."""
    if not value:
        raise ApiError(400, f"{where}: an id must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ApiError(400, f"{where}: an id is at most {MAX_ID_CHARS} characters")
    if _CONTROL.search(value):
        raise ApiError(400, f"{where}: an id must not hold control characters")
    return value


@dataclass
class Documents:
    """A request's documents split by kind, each with its position in the request."""

    id_positions: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    image_positions: list[int] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    echo: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, documents: list[str | DocumentObject], max_image_bytes: int) -> Documents:
        out = cls()
        for n, doc in enumerate(documents):
            where = f"documents[{n}]"
            image = doc if isinstance(doc, str) and doc.startswith("data:") else None
            if isinstance(doc, DocumentObject):
                image = doc.image
            if image is not None:
                out.image_positions.append(n)
                out.images.append(decode_image(image, where, max_image_bytes))
                out.echo.append({"image": image})
            else:
                image_id = check_id(doc if isinstance(doc, str) else doc.id, where)
                out.id_positions.append(n)
                out.ids.append(image_id)
                out.echo.append({"id": image_id})
        return out
