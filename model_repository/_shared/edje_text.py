"""Tokenizing text for Triton with the fast ``tokenizers`` library (a helper beside each model.py).

Used by ``edje_tokenizer`` (EDJE's pair layout, text + Q ``<image>`` tokens) and
``edje_text_tokenizer`` (single texts for the first-stage text tower). Both pad every row to a
fixed ``max_length``, so Triton's dynamic batcher can combine any requests, and tokenize all
texts of one ``execute`` in one call, each distinct text once (one query against K candidates
is encoded once).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from edje_backend_utils import Parameters, RequestError, input_array
from tokenizers import Tokenizer

IMAGE_TOKEN = "<image>"
# Only the first max_length tokens can reach the model, and a token spans at least one character:
# texts are cut to max_length * 64 characters before tokenizing, which bounds the work for
# megabyte-long input and changes nothing unless the head is mostly whitespace.
CHARS_PER_TOKEN_BOUND = 64


def load_tokenizer(path: Path, max_length: int, pad_id: int, pad_token: str) -> Tokenizer:
    """A tokenizer that pads and truncates (the text of) every input to ``max_length``."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_length, strategy="only_first")
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def tokenizer_from_config(params: Parameters, folder: Path) -> Tokenizer:
    """:func:`load_tokenizer` with the config's ``tokenizer_file`` (in ``folder``),
    ``max_length``, ``pad_token_id`` and ``pad_token``."""
    return load_tokenizer(
        folder / params.get_str("tokenizer_file", "tokenizer.json"),
        params.get_int("max_length", minimum=1),
        pad_id=params.get_int("pad_token_id", 0, minimum=0),
        pad_token=params.get_str("pad_token", "[PAD]"),
    )


def read_texts(request, name: str, max_chars: int) -> list[str]:
    """The request's texts (BYTES), decoded and cut to ``max_chars``; invalid UTF-8 is refused."""
    items = input_array(request, name).reshape(-1)
    try:
        return [bytes(item).decode("utf-8")[:max_chars] for item in items]
    except UnicodeDecodeError as exc:
        raise RequestError(f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def encode_texts(
    tokenizer: Tokenizer, texts: list[str], num_image_tokens: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, token_type_ids), int64 [N,L], for ``texts``, in one call.

    With ``num_image_tokens`` > 0 each text is paired with that many ``<image>`` tokens.
    """
    unique = list(dict.fromkeys(texts))
    image_part = IMAGE_TOKEN * num_image_tokens
    inputs = [(text, image_part) for text in unique] if num_image_tokens else unique
    encodings = tokenizer.encode_batch(inputs)
    row = {text: i for i, text in enumerate(unique)}
    take = np.fromiter((row[t] for t in texts), dtype=np.int64, count=len(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)[take]
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)[take]
    types = np.array([e.type_ids for e in encodings], dtype=np.int64)[take]
    return ids, mask, types
