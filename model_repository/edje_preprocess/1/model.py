"""edje_preprocess: encoded image bytes -> SigLIP pixel values.

Matches transformers' ``SiglipImageProcessor`` at fixed resolution: RGB (alpha composited on
white), bilinear resize to ``image_size`` square with no crop, scale by 1/255, normalise with
the configured mean and std. EXIF orientation is applied first. Images are decoded in a thread
pool (Pillow releases the GIL) and normalised as one batch. A bad image fails only its own
request, with ``INVALID_ARG`` and a message naming the problem.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from edje_backend_utils import get_parameter, parse_model_config
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


class TritonPythonModel:
    """Triton Python model: IMAGE (BYTES [1]) -> PIXEL_VALUES (FP32 [3,S,S])."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the processor settings from the config's parameters; start the decode pool."""
        config = parse_model_config(args)
        self.size = int(get_parameter(config, "image_size"))
        self.resample = int(get_parameter(config, "resample", "2"))
        self.scale = float(get_parameter(config, "rescale_factor", str(1 / 255)))
        self.mean = np.array(get_parameter(config, "image_mean").split(","), dtype=np.float32)
        self.std = np.array(get_parameter(config, "image_std").split(","), dtype=np.float32)
        self.max_pixels = int(get_parameter(config, "max_image_pixels", str(DEFAULT_MAX_PIXELS)))
        self.max_bytes = int(get_parameter(config, "max_image_bytes", str(DEFAULT_MAX_BYTES)))
        threads = int(get_parameter(config, "decode_threads", "4"))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def _decode(self, data: bytes) -> np.ndarray | ImageError:
        try:
            return decode_image(data, self.size, self.resample, self.max_pixels, self.max_bytes)
        except ImageError as exc:
            return exc

    def execute(self, requests: list) -> list:
        """Decode every image of every request in parallel; normalise all good ones at once.

        Returns one response per request, in order. A request with any bad image gets an
        ``INVALID_ARG`` error naming the item; the other requests are unaffected.
        """
        per_request = []
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            per_request.append([bytes(item) for item in items])
        decoded = list(self.pool.map(self._decode, [d for items in per_request for d in items]))

        responses, good, offset = [], [], 0
        for items in per_request:
            chunk = decoded[offset : offset + len(items)]
            offset += len(items)
            errors = [(i, r) for i, r in enumerate(chunk) if isinstance(r, ImageError)]
            if errors:
                i, err = errors[0]
                where = f"image {i} of {len(items)}: " if len(items) > 1 else ""
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            where + str(err), pb_utils.TritonError.INVALID_ARG
                        )
                    )
                )
            else:
                responses.append(None)
                good.append(chunk)
        if good:
            pixels = normalize(
                np.stack([a for chunk in good for a in chunk]), self.scale, self.mean, self.std
            )
            start = 0
            slots = iter(i for i, r in enumerate(responses) if r is None)
            for chunk in good:
                out = pb_utils.Tensor("PIXEL_VALUES", pixels[start : start + len(chunk)])
                responses[next(slots)] = pb_utils.InferenceResponse(output_tensors=[out])
                start += len(chunk)
        return responses

    def finalize(self) -> None:
        """Stop the decode pool."""
        self.pool.shutdown(wait=False)
