"""edje_preprocess: encoded image bytes -> SigLIP pixel values.

Matches transformers' ``SiglipImageProcessor`` at fixed resolution (see ``edje_image.py``
beside this file, which holds the decoding and normalisation and is shared with code outside
Triton). The images of all requests of one ``execute`` are decoded in parallel in a thread pool
(Pillow releases the GIL), then normalised as one batch. A bad image fails only its own
request, with ``INVALID_ARG`` and a message naming the item and the problem.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from edje_backend_utils import BatchExecutor, Parameters, RequestError, input_array, model_config
from edje_image import ImageError, ImageSettings, decode_image

# decode_image is re-exported for tests that fuzz the decoder through this module.
__all__ = ["ImageError", "TritonPythonModel", "decode_image"]


class TritonPythonModel:
    """Triton Python model: IMAGE (BYTES [1]) -> PIXEL_VALUES (FP32 [3,S,S])."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the processor settings from the config's parameters; start the decode pool."""
        config = model_config(args)
        self.settings = ImageSettings.from_config(config)
        threads = Parameters(config).get_int("decode_threads", 4, minimum=1)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.batch = BatchExecutor(config, read=self.read, check=self.check, run=self.run)

    def execute(self, requests: list) -> list:
        """Decode every image of every request in parallel; normalise all good ones at once.

        Returns
        -------
        list
            One response per request, in order. A request with any bad image gets an
            ``INVALID_ARG`` error naming the item; the other requests are unaffected.
        """
        return self.batch.execute(requests)

    def read(self, request) -> list[Future]:
        """Start decoding the request's images (every request's, before any is waited on)."""
        items = input_array(request, "IMAGE").reshape(-1)
        return [self.pool.submit(self.settings.decode, bytes(item)) for item in items]

    def check(self, decoding: list[Future]) -> list[np.ndarray]:
        """The request's decoded images; the first bad one fails the request, named."""
        images = []
        for i, future in enumerate(decoding):
            try:
                images.append(future.result())
            except ImageError as exc:
                where = f"image {i} of {len(decoding)}: " if len(decoding) > 1 else ""
                raise RequestError(where + str(exc)) from None
        return images

    def run(self, images: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
        """Normalise every good image of the batch at once."""
        flat = [image for request in images for image in request]
        size = self.settings.size
        batch = np.stack(flat) if flat else np.zeros((0, size, size, 3), dtype=np.uint8)
        return {"PIXEL_VALUES": self.settings.normalize(batch)}

    def finalize(self) -> None:
        """Stop the decode pool."""
        self.pool.shutdown(wait=False)
