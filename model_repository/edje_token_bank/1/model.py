"""edje_token_bank: image ids -> stored compressed tokens, for ``edje_rank_by_id``.

The bank is an image collection (a Lance dataset written by ``edje index``, local or at an
object-store URI), opened read-only. Integer image ids are the collection's rows (dense, in
commit order, never changing). The tokens are read into memory once, as float16, so a gather
is one numpy ``take`` per ``execute``, not storage I/O: at 50k pairs/s the gather, not the
ranker, would otherwise set the pace. Every ``execute`` first checks for a newer committed
version and reads only the rows it added, so an image is rankable by id from the first request
that starts after its commit; no restart. An unknown id fails its request with ``INVALID_ARG``
naming the id.

The reading lives in the shared helper ``edje_bank.py`` (numpy and pylance only, never the
client package).
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils
from edje_backend_utils import BatchExecutor, Parameters, RequestError, input_array, model_config
from edje_bank import TokenBank, physical_memory_bytes


class TritonPythonModel:
    """Triton Python model: TEXT [1], IMAGE_IDS [N] -> TEXTS [N,1], COMPRESSED_TOKENS [N,Q,D]."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the bank once; its shape and model must match the ranker's."""
        config = model_config(args)
        params = Parameters(config)
        uri = params.get_str("bank_path")
        max_bytes = params.get_int("max_bank_bytes", 0, minimum=0) or physical_memory_bytes()
        self.max_ids = params.get_int("max_ids", 256, minimum=1)
        dims = pb_utils.get_output_config_by_name(config, "COMPRESSED_TOKENS")["dims"]
        expect = tuple(int(d) for d in dims[1:])
        self.bank = TokenBank(uri, max_bytes, expect, params.get_str("model_id", ""))
        self.refresh_error: Exception | None = None
        self.batch = BatchExecutor(config, read=self.read, run=self.run, rows=lambda r: len(r[1]))

    def execute(self, requests: list) -> list:
        """Pick up new commits, then answer every request in order, with one gather."""
        self.refresh_error = None
        try:
            self.bank.refresh()
        except (OSError, ValueError, MemoryError) as exc:  # keep serving what is in memory
            self.refresh_error = exc
        return self.batch.execute(requests)

    def read(self, request) -> tuple[np.ndarray, np.ndarray]:
        """(the query text [1], its ids); :class:`RequestError` for no, too many or unknown ids."""
        text = input_array(request, "TEXT").reshape(-1)[:1]
        ids = input_array(request, "IMAGE_IDS").reshape(-1)
        try:
            if len(ids) == 0:
                raise LookupError("no image ids in the request")
            if len(ids) > self.max_ids:
                raise LookupError(f"{len(ids)} image ids in one request; at most {self.max_ids}")
            self.bank.check(ids)
        except LookupError as exc:
            message = str(exc)
            if self.refresh_error is not None:
                message += f" (the bank could not pick up new commits: {self.refresh_error})"
            raise RequestError(message) from None
        return text, ids

    def run(self, items: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Each request's text repeated per id, and the tokens of all ids in one gather."""
        texts = np.concatenate([np.repeat(text, len(ids)) for text, ids in items])
        rows = np.concatenate([ids for _, ids in items])
        return {"TEXTS": texts.reshape(-1, 1), "COMPRESSED_TOKENS": self.bank.gather(rows)}

    def finalize(self) -> None:
        """Drop the bank."""
        self.bank = None
