"""Encoded test images: every mode the preprocessor must accept, and bad payloads."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(width: int = 50, height: int = 37, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.frombytes(mode, (width, height), array.tobytes())


def good_images() -> dict[str, bytes]:
    """Name -> encoded bytes for each accepted kind of image."""
    palette = noise(seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rotated = noise(40, 20, seed=5)
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    sixteen = Image.fromarray(np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100)
    return {
        "rgb_png": encode(noise(seed=1)),
        "rgb_jpeg": encode(noise(seed=2), "JPEG", quality=90),
        "rgba_png": encode(noise(seed=3, mode="RGBA")),
        "grayscale_png": encode(noise(seed=6, mode="L")),
        "palette_gif": encode(palette, "GIF"),
        "cmyk_jpeg": encode(noise(seed=7, mode="CMYK"), "JPEG"),
        "exif_rotated_jpeg": encode(rotated, "JPEG", exif=exif),
        "gray16_png": encode(sixteen),
        "one_pixel_png": encode(Image.new("RGB", (1, 1), (9, 200, 30))),
        "webp": encode(noise(seed=8), "WEBP", lossless=True),
        "tiff": encode(noise(seed=9), "TIFF"),
        "bmp": encode(noise(seed=10), "BMP"),
    }


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Name -> (payload, a fragment the error message must contain)."""
    png = encode(noise(seed=11))
    return {
        "empty": (b"", "empty"),
        "garbage": (b"this is not an image", "cannot decode"),
        "truncated_png": (png[: len(png) // 2], "truncated or corrupt"),
        "corrupt_jpeg": (encode(noise(seed=12), "JPEG")[:200] + b"\x00" * 50, "cannot decode"),
        "bomb_png": (png_header_only(100_000, 100_000), "exceeds the limit"),
        "unsupported_ppm": (encode(noise(seed=13), "PPM"), "not a supported format"),
    }
