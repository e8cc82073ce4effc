"""The published architecture at full size, random weights: token format and model size."""

from __future__ import annotations

import torch

from edje.configuration import published_language_config, published_vision_config
from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking

# SigLIP2 ViT-L/16 at 384 px and MiniLM-L12-H384-uncased, as in the published checkpoint.
VISION = published_vision_config()
MINILM = published_language_config()


def test_real_size_token_format_and_ranker_size():
    torch.manual_seed(0)
    indexing = EDJEModelForIndexing(
        vision_config=VISION, language_config=MINILM, num_compressed_tokens=64
    ).eval()
    with torch.no_grad():
        out = indexing.encode(torch.randn(1, 3, 384, 384))
    tokens = out.compressed_tokens.to(torch.float16)
    assert tokens.shape == (1, 64, 384)
    assert tokens.numel() * tokens.element_size() == 49_152
    assert out.image_embedding.shape == (1, 1024)
    assert indexing.vision_encoder.config.image_size // 16 == 24  # 576 patch tokens

    ranking = EDJEModelForRanking(language_config=MINILM, num_compressed_tokens=64)
    serving = [ranking.language_model.bert, ranking.classification_head]
    params = sum(p.numel() for m in serving for p in m.parameters())
    assert 32e6 < params < 34.5e6, params  # "33M" in the model card
    assert ranking.image_token_id == 30522
    assert ranking.language_model.bert.embeddings.word_embeddings.num_embeddings == 30523
