"""The shape contract of an EDJE model, stated once (transformers style), and the published
architecture's configs (no download), for tests and benchmarks.

Every part of the system agrees on these numbers: the PyTorch models, the ONNX export, the
Triton configs the builder writes (and so what clients read from the server), the collections
that store tokens, the benchmarks and the training code.

========================  =====  ==========================================================
field                     paper  meaning
========================  =====  ==========================================================
``num_compressed_tokens``    64  Q: tokens per image, the adapter's learnable queries
``token_width``             384  D: width of each token = the joint encoder's hidden size
``embedding_dim``          1024  E: the first-stage (SigLIP) image and text embedding size
``image_size``              384  pixels of the square image the ViT reads
``max_text_tokens``          64  text tokens of a pair, ``[CLS]`` and ``[SEP]`` included
``pair_length``             128  ``max_text_tokens + Q``: the ranker's sequence length
``query_tokens``             64  the first stage's text length (SigLIP pads to it)
``image_token``       <image>    the special token whose embeddings the Q tokens replace
``image_token_id``        30522  its id: the language model's original vocabulary size
========================  =====  ==========================================================
"""

from __future__ import annotations

from transformers import BertConfig, PretrainedConfig, SiglipVisionConfig

PUBLISHED_NUM_TOKENS = 64
MAX_TEXT_TOKENS = 64
QUERY_TOKENS = 64
IMAGE_TOKEN = "<image>"
PROJECTION_COMPRESSED = "compressed"
PROJECTION_LOCAL = "local"
ADAPTER_MLP_DIM = 8192


class EDJEConfig(PretrainedConfig):
    """The shape contract (see the module docstring); the defaults are the published model's."""

    model_type = "edje"

    def __init__(
        self,
        num_compressed_tokens: int = PUBLISHED_NUM_TOKENS,
        token_width: int = 384,
        embedding_dim: int = 1024,
        image_size: int = 384,
        max_text_tokens: int = MAX_TEXT_TOKENS,
        query_tokens: int = QUERY_TOKENS,
        projection_type: str = PROJECTION_COMPRESSED,
        adapter_mlp_dim: int = ADAPTER_MLP_DIM,
        image_token: str = IMAGE_TOKEN,
        image_token_id: int = 30522,
        **kwargs,
    ) -> None:
        if projection_type not in (PROJECTION_COMPRESSED, PROJECTION_LOCAL):
            raise ValueError(
                f"projection_type must be 'compressed' or 'local', got {projection_type!r}"
            )
        for name, value in (
            ("num_compressed_tokens", num_compressed_tokens),
            ("token_width", token_width),
            ("embedding_dim", embedding_dim),
            ("image_size", image_size),
            ("max_text_tokens", max_text_tokens),
            ("query_tokens", query_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_compressed_tokens = num_compressed_tokens
        self.token_width = token_width
        self.embedding_dim = embedding_dim
        self.image_size = image_size
        self.max_text_tokens = max_text_tokens
        self.query_tokens = query_tokens
        self.projection_type = projection_type
        self.adapter_mlp_dim = adapter_mlp_dim
        self.image_token = image_token
        self.image_token_id = image_token_id
        super().__init__(**kwargs)

    @property
    def pair_length(self) -> int:
        """Positions of one (text, image) pair: ``max_text_tokens + Q``."""
        return self.max_text_tokens + self.num_compressed_tokens

    @property
    def token_shape(self) -> tuple[int, int]:
        """``(Q, D)``: one image's stored tokens."""
        return (self.num_compressed_tokens, self.token_width)

    def dims(self) -> dict[str, int]:
        """The numbers the Triton configs and the manifest carry."""
        return {
            "image_size": self.image_size,
            "num_tokens": self.num_compressed_tokens,
            "token_width": self.token_width,
            "embedding_dim": self.embedding_dim,
            "pair_length": self.pair_length,
            "text_length": self.query_tokens,
        }


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
