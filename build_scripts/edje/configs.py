"""The published EDJE architecture as config objects (no download): for tests and benchmarks."""

from __future__ import annotations

from transformers import BertConfig, SiglipVisionConfig


def published_vision_config() -> SiglipVisionConfig:
    """SigLIP2 ViT-L/16 at 384 px: width 1024, 24 layers, 16 heads, 576 patch tokens."""
    return SiglipVisionConfig(
        image_size=384,
        patch_size=16,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        layer_norm_eps=1e-6,
    )


def published_language_config() -> BertConfig:
    """MiniLM-L12-H384-uncased: width 384, 12 layers, 12 heads, intermediate 1536."""
    return BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        hidden_act="gelu",
    )
