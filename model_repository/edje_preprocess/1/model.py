"""edje_preprocess: encoded image bytes -> SigLIP pixel values.

Matches transformers' ``SiglipImageProcessor`` at fixed resolution (see ``edje_image.py``
beside this file, which holds the decoding and normalisation and is shared with code outside
Triton). Images are decoded in a thread pool (Pillow releases the GIL) and normalised as one
batch. A bad image fails only its own request, with ``INVALID_ARG`` and a message naming the
problem.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from edje_backend_utils import get_parameter, parse_model_config
from edje_image import ImageError, ImageSettings, decode_image

# decode_image is re-exported for tests that fuzz the decoder through this module.
__all__ = ["ImageError", "TritonPythonModel", "decode_image"]


class TritonPythonModel:
    """Triton Python model: IMAGE (BYTES [1]) -> PIXEL_VALUES (FP32 [3,S,S])."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the processor settings from the config's parameters; start the decode pool."""
        config = parse_model_config(args)
        self.settings = ImageSettings.from_config(config)
        threads = int(get_parameter(config, "decode_threads", "4"))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def _decode(self, data: bytes) -> np.ndarray | ImageError:
        try:
            return self.settings.decode(data)
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
            pixels = self.settings.normalize(np.stack([a for chunk in good for a in chunk]))
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
