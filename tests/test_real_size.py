"""The published architecture at full size, random weights: token format and model size."""

from __future__ import annotations

import torch
from transformers import BertConfig, SiglipVisionConfig

from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking

# SigLIP2 ViT-L/16 at 384 px and MiniLM-L12-H384-uncased, as in the published checkpoint.
VISION = SiglipVisionConfig(
    image_size=384,
    patch_size=16,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    layer_norm_eps=1e-6,
)
MINILM = BertConfig(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    hidden_act="gelu",
)


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
