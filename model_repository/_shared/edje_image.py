"""Image decoding and normalisation of ``edje_preprocess``, free of Triton (copied beside models).

Matches transformers' ``SiglipImageProcessor`` at fixed resolution: RGB (alpha composited on
white), bilinear resize to ``image_size`` square with no crop, scale by ``rescale_factor``,
normalise with the configured mean and std. EXIF orientation is applied first.

``edje_preprocess/1/model.py`` runs these functions inside Triton; code outside Triton (the Ray
indexer's in-process encoder) loads this very file from a built repository, so both paths
preprocess identically. Only the standard library, numpy, Pillow and ``edje_params.py`` (the
typed parameter readers, beside this file) may be imported here.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from edje_params import Parameters
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


class ImageError(ValueError):
    """An input image that cannot be used; the message is safe to return to the client."""


def decode_image(
    data: bytes, size: int, resample: int, max_pixels: int, max_bytes: int
) -> np.ndarray:
    """Decode one encoded image to a ``size`` x ``size`` x 3 uint8 RGB array.

    Raises
    ------
    ImageError
        For empty, oversized, undecodable, truncated or unsupported input.
    """
    if not data:
        raise ImageError("empty image payload (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"image payload of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{max_pixels} pixels (decompression-bomb guard)"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            "cannot decode image: not a supported format "
            f"({', '.join(SUPPORTED_FORMATS)}) or corrupt header"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image exceeds the limit of {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot decode image: truncated or corrupt data ({exc})") from None
    return np.asarray(to_rgb(image).resize((size, size), resample=resample), dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' ``convert_to_rgb`` does it: alpha composited onto white.

    16- and 32-bit greyscale are rescaled to 8 bits first rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode != "F" else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def normalize(batch: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W]: ``(x * scale - mean) / std``."""
    pixels = batch.astype(np.float32) * np.float32(scale)
    pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class ImageSettings:
    """The preprocessing parameters of ``edje_preprocess/config.pbtxt``, with their defaults."""

    size: int
    mean: np.ndarray
    std: np.ndarray
    resample: int = 2
    scale: float = 1 / 255
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_config(cls, model_config: dict[str, Any]) -> ImageSettings:
        """Read the settings from a model config as a dict (Triton's JSON of ``config.pbtxt``,
        or ``json_format.MessageToDict(..., preserving_proto_field_name=True)`` of it)."""
        params = Parameters(model_config)
        return cls(
            size=params.get_int("image_size", minimum=1),
            mean=np.array(params.get_floats("image_mean"), dtype=np.float32),
            std=np.array(params.get_floats("image_std"), dtype=np.float32),
            resample=params.get_int("resample", 2),
            scale=params.get_float("rescale_factor", 1 / 255),
            max_pixels=params.get_int("max_image_pixels", DEFAULT_MAX_PIXELS, minimum=1),
            max_bytes=params.get_int("max_image_bytes", DEFAULT_MAX_BYTES, minimum=1),
        )

    def decode(self, data: bytes) -> np.ndarray:
        """:func:`decode_image` with these settings (raises :class:`ImageError`)."""
        return decode_image(data, self.size, self.resample, self.max_pixels, self.max_bytes)

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """:func:`normalize` with these settings: uint8 [N,S,S,3] -> float32 [N,3,S,S]."""
        return normalize(batch, self.scale, self.mean, self.std)
