"""edje_tokenizer: query text -> EDJE's pair layout for the ranker.

Every row is ``[CLS] text [SEP] <image>xQ [SEP] [PAD]...``, padded to a fixed ``max_length``
(64 + Q by default), with token types 0 over the text and 1 over the image part; only the text
is truncated, so the Q image slots are always intact. The tokenizer (``tokenizer.json`` beside
this file) is loaded once; the texts of all requests of one ``execute`` are tokenized in one
call (``edje_text.py``), and invalid UTF-8 fails only its own request with ``INVALID_ARG``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from edje_backend_utils import BatchExecutor, Parameters, model_config
from edje_text import CHARS_PER_TOKEN_BOUND, encode_texts, read_texts, tokenizer_from_config

# encode_texts is re-exported for tests that fuzz the layout through this module.
__all__ = ["TritonPythonModel", "encode_texts"]


class TritonPythonModel:
    """Triton Python model: TEXT (BYTES [1]) -> INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the tokenizer once; read Q (``num_image_tokens``) and the pair length."""
        config = model_config(args)
        params = Parameters(config)
        self.num_image_tokens = params.get_int("num_image_tokens", minimum=1)
        self.max_length = params.get_int("max_length", minimum=self.num_image_tokens + 3)
        self.max_chars = self.max_length * CHARS_PER_TOKEN_BOUND
        self.tokenizer = tokenizer_from_config(params, Path(__file__).parent)
        self.batch = BatchExecutor(config, read=self.read, run=self.run)

    def execute(self, requests: list) -> list:
        """One response per request, in order: every pair of the batch in one tokenizer call."""
        return self.batch.execute(requests)

    def read(self, request) -> list[str]:
        """The request's texts (:class:`RequestError` for invalid UTF-8)."""
        return read_texts(request, "TEXT", self.max_chars)

    def run(self, texts: list[list[str]]) -> dict[str, np.ndarray]:
        """Every text paired with Q ``<image>`` tokens, in one tokenizer call."""
        flat = [text for row in texts for text in row]
        ids, mask, types = encode_texts(self.tokenizer, flat, self.num_image_tokens)
        return {"INPUT_IDS": ids, "ATTENTION_MASK": mask, "TOKEN_TYPE_IDS": types}
