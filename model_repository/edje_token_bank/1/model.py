"""edje_token_bank: image ids -> stored compressed tokens, for ``edje_rank_by_id``.

The bank is a token store written by ``edje index`` / ``TokenStore`` (its ``tokens/`` directory,
or a store directory holding one), opened read-only and memory-mapped: integer ids are the
store's rows. Every ``execute`` first picks up batches committed since the last one, so an image
is rankable by id from the first request that starts after its ``put`` returned; no restart.
An unknown id fails its request with ``INVALID_ARG`` naming the id.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from edje_backend_utils import get_parameter, parse_model_config

from edje_client.store import TokenStore


def physical_memory_bytes() -> int:
    """This machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def open_bank(path: Path, max_bytes: int) -> TokenStore:
    """Open the token store at ``path`` read-only; refuse one larger than ``max_bytes``."""
    if (path / "tokens").is_dir():
        path = path / "tokens"
    store = TokenStore(path, readonly=True, create=False)
    size = (store.bytes_per_entry or 0) * len(store)
    if size > max_bytes:
        store.close()
        raise MemoryError(
            f"token bank {path} holds {size / 1e9:.1f} GB, more than the {max_bytes / 1e9:.1f} GB "
            "allowed (max_bank_bytes; default: this machine's RAM): shard it across servers"
        )
    return store


class TritonPythonModel:
    """Triton Python model: TEXT [1], IMAGE_IDS [N] -> TEXTS [N,1], COMPRESSED_TOKENS [N,Q,D]."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the bank once; its shape must match the ranker's."""
        config = parse_model_config(args)
        path = get_parameter(config, "bank_path")
        if not path:
            raise ValueError("edje_token_bank needs the parameter bank_path")
        max_bytes = int(get_parameter(config, "max_bank_bytes", "0")) or physical_memory_bytes()
        self.max_ids = int(get_parameter(config, "max_ids", "256"))
        self.store = open_bank(Path(path), max_bytes)
        dims = next(o["dims"] for o in config["output"] if o["name"] == "COMPRESSED_TOKENS")
        expected = tuple(int(d) for d in dims[1:])
        if self.store.shape not in (None, expected):
            raise ValueError(f"token bank holds {self.store.shape} tokens, the ranker {expected}")

    def _lookup(self, request) -> pb_utils.InferenceResponse:
        text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        ids = pb_utils.get_input_tensor_by_name(request, "IMAGE_IDS").as_numpy().reshape(-1)
        if len(ids) == 0:
            raise LookupError("no image ids in the request")
        if len(ids) > self.max_ids:
            raise LookupError(f"{len(ids)} image ids in one request; at most {self.max_ids}")
        size = len(self.store)
        unknown = ids[(ids < 0) | (ids >= size)]
        if unknown.size:
            raise LookupError(
                f"unknown image id {int(unknown[0])} (the bank holds ids 0..{size - 1})"
                if size
                else f"unknown image id {int(unknown[0])} (the bank is empty)"
            )
        tokens = self.store.get_rows(ids)
        texts = np.repeat(text[:1], len(ids)).reshape(-1, 1).astype(object)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("TEXTS", texts),
                pb_utils.Tensor("COMPRESSED_TOKENS", tokens),
            ]
        )

    def execute(self, requests: list) -> list:
        """Refresh the bank, then look up each request's ids (one gather per request)."""
        self.store.refresh()
        responses = []
        for request in requests:
            try:
                responses.append(self._lookup(request))
            except LookupError as exc:
                err = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
        return responses

    def finalize(self) -> None:
        """Close the bank."""
        self.store.close()
