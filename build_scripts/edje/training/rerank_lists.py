"""Re-rank lists: what serving re-ranks, as ranker feeds, built from a model source.

Each list is one caption of a synthetic split with the ``k`` images the source's own first
stage ranks highest for it, laid out as serving lays out pairs (``edje_tokenizer``). The
benchmarks measure int8 agreement on them; quantisation-aware fine-tuning trains on them.
"""

from __future__ import annotations

import numpy as np
import torch

from edje import synthetic
from edje.configuration import MAX_TEXT_TOKENS
from edje.training.first_stage import embed_texts


def pair_layouts(tokenizer, captions: list[str], q: int) -> dict[str, np.ndarray]:
    """Serving's pair layout (edje_tokenizer) for one caption per pair."""
    enc = tokenizer(
        captions,
        ["<image>" * q] * len(captions),
        truncation="only_first",
        max_length=MAX_TEXT_TOKENS + q,
        padding="longest",
        return_tensors="np",
    )
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def rerank_lists(source, split: str = "test", k: int = 10) -> list[dict[str, np.ndarray]]:
    """Real re-rank lists: every caption of the synthetic ``split`` (one image per scene) with
    the ``k`` images the source's own first stage ranks highest for it, as ranker feeds."""
    indexing, _ = source.build_indexing_model()
    text_model, _ = source.build_text_model()
    tokenizer, text_tokenizer = source.tokenizer(), source.text_tokenizer()
    processor = source.image_processor()
    examples = list(synthetic.generate(split, 0, images_per_scene=1))
    with torch.no_grad():
        pixels = processor(images=[e.image for e in examples], return_tensors="pt")
        encoded = indexing.encode(pixels["pixel_values"])
    tokens = encoded.compressed_tokens.to(torch.float16).numpy()  # stored as fp16
    captions = [e.captions[0] for e in examples]
    text = embed_texts(text_model, text_tokenizer, captions, text_tokenizer.model_max_length)
    top = torch.topk(text @ encoded.image_embedding.T, k, dim=1).indices.numpy()
    q = tokens.shape[1]
    return [
        {**pair_layouts(tokenizer, [caption] * k, q), "compressed_tokens": tokens[images]}
        for caption, images in zip(captions, top, strict=True)
    ]
