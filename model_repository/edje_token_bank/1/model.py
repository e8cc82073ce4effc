"""edje_token_bank: image ids -> stored compressed tokens, for ``edje_rank_by_id``.

The bank is an image collection (a Lance dataset written by ``edje index``, local or at an
object-store URI), opened read-only. Integer image ids are the collection's rows (dense, in
commit order, never changing). The tokens are read into memory once, as float16, so a gather
is one numpy ``take``, not storage I/O: at 50k pairs/s the gather, not the ranker, would
otherwise set the pace. Every ``execute`` first checks for a newer committed version and reads
only the rows it added, so an image is rankable by id from the first request that starts after
its commit; no restart. An unknown id fails its request with ``INVALID_ARG`` naming the id.

The reading lives in the shared helper ``edje_bank.py`` (numpy and pylance only, never the
client package).
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils
from edje_backend_utils import get_parameter, parse_model_config
from edje_bank import TokenBank, physical_memory_bytes


class TritonPythonModel:
    """Triton Python model: TEXT [1], IMAGE_IDS [N] -> TEXTS [N,1], COMPRESSED_TOKENS [N,Q,D]."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the bank once; its shape and model must match the ranker's."""
        config = parse_model_config(args)
        uri = get_parameter(config, "bank_path")
        if not uri:
            raise ValueError("edje_token_bank needs the parameter bank_path")
        max_bytes = int(get_parameter(config, "max_bank_bytes", "0")) or physical_memory_bytes()
        self.max_ids = int(get_parameter(config, "max_ids", "256"))
        dims = next(o["dims"] for o in config["output"] if o["name"] == "COMPRESSED_TOKENS")
        expect = tuple(int(d) for d in dims[1:])
        model_id = get_parameter(config, "model_id", "")
        self.bank = TokenBank(uri, max_bytes, expect, model_id)

    def _lookup(self, request) -> pb_utils.InferenceResponse:
        text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        ids = pb_utils.get_input_tensor_by_name(request, "IMAGE_IDS").as_numpy().reshape(-1)
        if len(ids) == 0:
            raise LookupError("no image ids in the request")
        if len(ids) > self.max_ids:
            raise LookupError(f"{len(ids)} image ids in one request; at most {self.max_ids}")
        tokens = self.bank.gather(ids)
        texts = np.repeat(text[:1], len(ids)).reshape(-1, 1).astype(object)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("TEXTS", texts),
                pb_utils.Tensor("COMPRESSED_TOKENS", tokens),
            ]
        )

    def execute(self, requests: list) -> list:
        """Pick up new commits, then look up each request's ids (one gather per request)."""
        refresh_error = None
        try:
            self.bank.refresh()
        except (OSError, ValueError, MemoryError) as exc:  # keep serving what is in memory
            refresh_error = exc
        responses = []
        for request in requests:
            try:
                responses.append(self._lookup(request))
            except LookupError as exc:
                message = str(exc)
                if refresh_error is not None:
                    message += f" (the bank could not pick up new commits: {refresh_error})"
                err = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
        return responses

    def finalize(self) -> None:
        """Drop the bank."""
        self.bank = None
