"""Text tokenizer for Triton, with the fast ``tokenizers`` library.

As ``edje_tokenizer`` (``num_image_tokens`` = Q > 0) it produces EDJE's pair layout: every row
is ``[CLS] text [SEP] <image>xQ [SEP] [PAD]...`` padded to a fixed ``max_length`` (64 + Q by
default), with token types 0 over the text and 1 over the image part; only the text is
truncated. As ``edje_text_tokenizer`` (``num_image_tokens`` = 0) it pads single texts to the
first-stage text tower's fixed length. A fixed length lets Triton's dynamic batcher combine any
requests. Texts repeated inside one ``execute`` (one query against K candidates) are tokenized
once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from edje_backend_utils import get_parameter, parse_model_config
from tokenizers import Tokenizer

IMAGE_TOKEN = "<image>"
# Only the first max_length tokens can reach the ranker, and a token spans at least one character:
# texts are cut to max_length * 64 characters before tokenizing, which bounds the work for
# megabyte-long input and changes nothing unless the head is mostly whitespace.
CHARS_PER_TOKEN_BOUND = 64


def load_tokenizer(path: Path, max_length: int, pad_id: int, pad_token: str) -> Tokenizer:
    """A tokenizer that pads and truncates (the text of) every input to ``max_length``."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_length, strategy="only_first")
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def encode_texts(
    tokenizer: Tokenizer, texts: list[str], num_image_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, token_type_ids), int64 [N,L], for ``texts``.

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


class TritonPythonModel:
    """Triton Python model: TEXT (BYTES [1]) -> INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the tokenizer once, from ``tokenizer.json`` beside this file."""
        config = parse_model_config(args)
        self.num_image_tokens = int(get_parameter(config, "num_image_tokens"))
        self.max_length = int(get_parameter(config, "max_length"))
        self.max_chars = self.max_length * CHARS_PER_TOKEN_BOUND
        path = Path(__file__).parent / get_parameter(config, "tokenizer_file", "tokenizer.json")
        self.tokenizer = load_tokenizer(
            path,
            self.max_length,
            pad_id=int(get_parameter(config, "pad_token_id", "0")),
            pad_token=get_parameter(config, "pad_token", "[PAD]"),
        )

    def execute(self, requests: list) -> list:
        """Tokenize the texts of all requests in one call; one response per request."""
        texts: list[list[str]] = []
        errors: dict[int, str] = {}
        for n, request in enumerate(requests):
            items = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            try:
                texts.append([bytes(item).decode("utf-8")[: self.max_chars] for item in items])
            except UnicodeDecodeError as exc:
                errors[n] = f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                texts.append([])
        flat = [t for row in texts for t in row]
        if flat:
            ids, mask, types = encode_texts(self.tokenizer, flat, self.num_image_tokens)
        responses, start = [], 0
        for n, row in enumerate(texts):
            if n in errors:
                err = pb_utils.TritonError(errors[n], pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            end = start + len(row)
            outputs = [
                pb_utils.Tensor("INPUT_IDS", ids[start:end]),
                pb_utils.Tensor("ATTENTION_MASK", mask[start:end]),
                pb_utils.Tensor("TOKEN_TYPE_IDS", types[start:end]),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            start = end
        return responses
