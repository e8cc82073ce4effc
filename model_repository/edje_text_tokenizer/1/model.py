"""edje_text_tokenizer: a first-stage query text -> the SigLIP text tower's token ids.

Single texts (no image tokens), truncated and padded to the tower's fixed length
(``max_length``, 64 for SigLIP), so the dynamic batcher can combine any requests. The tokenizer
(``tokenizer.json`` beside this file) is loaded once; all texts of one ``execute`` are tokenized
in one call (``edje_text.py``, shared with ``edje_tokenizer``), and invalid UTF-8 fails only its
own request with ``INVALID_ARG``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from edje_backend_utils import BatchExecutor, Parameters, model_config
from edje_text import CHARS_PER_TOKEN_BOUND, encode_texts, read_texts, tokenizer_from_config


class TritonPythonModel:
    """Triton Python model: TEXT (BYTES [1]) -> INPUT_IDS (+ its mask and token types)."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the tokenizer once, padding single texts to ``max_length``."""
        config = model_config(args)
        params = Parameters(config)
        self.tokenizer = tokenizer_from_config(params, Path(__file__).parent)
        max_chars = params.get_int("max_length") * CHARS_PER_TOKEN_BOUND
        read = partial(read_texts, name="TEXT", max_chars=max_chars)  # RequestError: bad UTF-8
        self.batch = BatchExecutor(config, read=read, run=self.run)

    def execute(self, requests: list) -> list:
        """One response per request, in order: every text of the batch in one tokenizer call."""
        return self.batch.execute(requests)

    def run(self, texts: list[list[str]]) -> dict[str, np.ndarray]:
        """The ids of every text; of these outputs, those the config lists are sent."""
        ids, mask, types = encode_texts(self.tokenizer, [t for row in texts for t in row])
        return {"INPUT_IDS": ids, "ATTENTION_MASK": mask, "TOKEN_TYPE_IDS": types}
