"""Small EDJE model sources built offline: for tests and the random-weight fallback default.

Everything here is made locally (configs, a WordPiece vocabulary, random weights), so nothing
is downloaded. The result is a normal model source directory (see :mod:`edje.model_source`)
saved in the research checkpoint layout.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

from edje.configuration import MAX_TEXT_TOKENS, PUBLISHED_NUM_TOKENS, QUERY_TOKENS
from edje.model_source import ModelSource
from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BASIC_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "to",
    "with",
    "and",
    "or",
    "is",
    "are",
    "photo",
    "picture",
    "image",
    "dog",
    "cat",
    "puppy",
    "sofa",
    "sleeping",
    "golden",
    "retriever",
    "cute",
    "beautiful",
    "sunset",
    "over",
    "ocean",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "circle",
    "square",
    "triangle",
    "left",
    "right",
    "above",
    "below",
    "next",
    "one",
    "two",
    "three",
    "small",
    "large",
    "big",
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny EDJE. Defaults keep the published token format (Q=64, D=384)."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 1
    language_width: int = 384
    language_layers: int = 2
    language_heads: int = 6
    language_intermediate: int = 512
    num_compressed_tokens: int = PUBLISHED_NUM_TOKENS
    adapter_mlp_dim: int = 256
    max_text_tokens: int = MAX_TEXT_TOKENS


def make_vocab(words: list[str] = BASIC_WORDS) -> dict[str, int]:
    """A WordPiece vocabulary: specials, single characters (+ ## forms) and whole words."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars] + sorted(set(words))
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def siglip_processor(image_size: int) -> SiglipImageProcessorPil:
    """SigLIP2's fixed-resolution preprocessing: bilinear resize to a square, mean/std 0.5."""
    return SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=2,  # bilinear
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def make_tiny_source(
    out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0, description: str = ""
) -> ModelSource:
    """Write a complete model source with random weights to ``out_dir`` and return it."""
    out = Path(out_dir)
    (out / "siglip").mkdir(parents=True, exist_ok=True)
    (out / "language_model").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = BertTokenizerFast(vocab=make_vocab(), do_lower_case=True)
    tokenizer.save_pretrained(out / "language_model")
    language_config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=spec.language_width,
        num_hidden_layers=spec.language_layers,
        num_attention_heads=spec.language_heads,
        intermediate_size=spec.language_intermediate,
        max_position_embeddings=max(128, spec.max_text_tokens + spec.num_compressed_tokens),
        hidden_act="gelu",
    )
    language_config.save_pretrained(out / "language_model")

    siglip_config = SiglipConfig(
        vision_config=dict(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            hidden_size=spec.vision_width,
            intermediate_size=spec.vision_width * 4,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
        ),
        text_config=dict(
            vocab_size=tokenizer.vocab_size,
            hidden_size=spec.text_width,
            projection_size=spec.vision_width,  # the image and text embeddings share a space
            pad_token_id=tokenizer.pad_token_id,
            intermediate_size=spec.text_width * 4,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=QUERY_TOKENS,
        ),
    )
    siglip_config.save_pretrained(out / "siglip")
    # The first stage's text tokenizer (SigLIP pads every text to a fixed length).
    BertTokenizerFast(vocab=make_vocab(), do_lower_case=True, model_max_length=16).save_pretrained(
        out / "siglip"
    )
    siglip_processor(spec.image_size).save_pretrained(out / "siglip")

    indexing = EDJEModelForIndexing(
        vision_config=siglip_config.vision_config,
        language_config=language_config,
        num_compressed_tokens=spec.num_compressed_tokens,
        adapter_mlp_dim=spec.adapter_mlp_dim,
    )
    ranking = EDJEModelForRanking(
        language_config=language_config, num_compressed_tokens=spec.num_compressed_tokens
    )
    # The first-stage dual encoder ("clip"); EDJE's frozen ViT is its vision tower.
    clip = SiglipModel(siglip_config)
    indexing.vision_encoder.load_state_dict(clip.vision_model.state_dict())
    source = ModelSource(
        siglip_path="siglip",
        language_model_path="language_model",
        checkpoint="edje.safetensors",
        num_compressed_tokens=spec.num_compressed_tokens,
        adapter_mlp_dim=spec.adapter_mlp_dim,
        max_text_tokens=spec.max_text_tokens,
        description=description or "tiny EDJE with random weights (tests only)",
        random_weights=True,
    )
    save_checkpoint(out / source.checkpoint, indexing, ranking, clip)
    source.save(out)
    return ModelSource.from_dir(out)


def save_checkpoint(
    path: Path,
    indexing: EDJEModelForIndexing,
    ranking: EDJEModelForRanking,
    clip: SiglipModel | None = None,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Save the models' weights as one research-layout safetensors file.

    ``clip`` is stored under ``clip.*``, each of ``extra`` under its key (``text_projection``).
    """
    from safetensors.torch import save_file

    from edje.checkpoint import OPTIONAL_PREFIXES, to_research_layout

    tensors = to_research_layout({**indexing.state_dict(), **ranking.state_dict()})
    for prefix, module in {"clip": clip, **(extra or {})}.items():
        if module is not None:
            tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    # Tied tensors (the MLM decoder is the word embedding table) are stored once: loading the
    # table ties them again, and the decoder is a training-only key (checkpoint.OPTIONAL_PREFIXES).
    stored: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for k, v in tensors.items():
        identity = (v.data_ptr(), tuple(v.shape))
        if identity in seen and k.startswith(OPTIONAL_PREFIXES):
            continue
        seen.add(identity)
        stored[k] = v.detach().cpu().to(dtype if v.is_floating_point() else v.dtype).clone()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    return path
