"""EDJE's two inference networks, with the research checkpoint's parameter names.

* :class:`EDJEModelForIndexing`: SigLIP ViT + token-compression adapter (offline, per image).
* :class:`EDJEModelForRanking`: MiniLM joint encoder + classification head (online, per pair).

Attribute names (``vision_encoder``, ``vision_projection``, ``language_model``,
``classification_head``) follow the research layout, so a research ``{"model": state_dict}``
loads without renaming. See DESIGN.md §2 for the architecture.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    BertConfig,
    BertForMaskedLM,
    PretrainedConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertPooler

from edje.configuration import (
    ADAPTER_MLP_DIM,
    MAX_TEXT_TOKENS,
    PROJECTION_COMPRESSED,
    PROJECTION_LOCAL,
    PUBLISHED_NUM_TOKENS,
)


def accept_nested_siglip_names(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Load-state-dict pre-hook: accept ``<prefix>vision_model.*`` names for a flattened ViT.

    transformers 5 flattened ``SiglipVisionModel``; research checkpoints (and the seed's
    ``load_state_dict(..., strict=False)``, which would silently skip them) use nested names.
    """
    nested = prefix + "vision_model."
    if hasattr(module, "vision_model"):
        return
    for key in [k for k in state_dict if k.startswith(nested)]:
        state_dict[prefix + key[len(nested) :]] = state_dict.pop(key)


def load_vision_config(siglip_path: str) -> SiglipVisionConfig:
    """Read the vision tower's config from a SigLIP (or SigLIP2) model directory or hub name."""
    config = AutoConfig.from_pretrained(siglip_path)
    return getattr(config, "vision_config", config)


def load_language_config(language_model_path: str) -> BertConfig:
    """Read the BERT/MiniLM config from a model directory or hub name."""
    return BertConfig.from_pretrained(language_model_path)


def num_patches(vision_config: SiglipVisionConfig) -> int:
    """Number of patch tokens the ViT produces (576 for 384 px at patch 16)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


class AdapterMLP(nn.Module):
    """``fc2(act(fc1(x)))``, the adapter's feed-forward block."""

    def __init__(self, width: int, hidden: int, hidden_act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenCompressionAdapter(nn.Module):
    """Cross-attention from Q learnable queries to the ViT's patch tokens, then Dv -> Dl.

    ``h = MHA(query, key(x), value(x)); h = h + mlp(layernorm(h)); return projection(h)``.
    """

    def __init__(
        self,
        vision_width: int,
        language_width: int,
        num_queries: int,
        num_heads: int,
        layer_norm_eps: float,
        hidden_act: str,
        mlp_dim: int = ADAPTER_MLP_DIM,
    ) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, num_queries, vision_width) * 0.02)
        self.key = nn.Linear(vision_width, vision_width)
        self.value = nn.Linear(vision_width, vision_width)
        self.attention = nn.MultiheadAttention(vision_width, num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(vision_width, eps=layer_norm_eps)
        self.mlp = AdapterMLP(vision_width, mlp_dim, hidden_act)
        self.projection = nn.Linear(vision_width, language_width)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        query = self.query.expand(patch_tokens.shape[0], -1, -1)
        hidden, _ = self.attention(
            query, self.key(patch_tokens), self.value(patch_tokens), need_weights=False
        )
        hidden = hidden + self.mlp(self.layernorm(hidden))
        return self.projection(hidden)


def local_projection(vision_width: int, language_width: int, hidden_act: str) -> nn.Sequential:
    """The "Local" variant: a per-token MLP over all patch tokens, no compression."""
    return nn.Sequential(
        nn.Linear(vision_width, ADAPTER_MLP_DIM),
        ACT2FN[hidden_act],
        nn.Linear(ADAPTER_MLP_DIM, language_width),
    )


@dataclass
class IndexingOutput:
    """One ViT pass, both products: ranker tokens and the first-stage embedding."""

    compressed_tokens: torch.Tensor  # (B, Q, Dl)
    image_embedding: torch.Tensor  # (B, E), L2-normalised SigLIP pooled embedding


class EDJEModelForIndexing(nn.Module):
    """Image -> Q compressed tokens (and the SigLIP image embedding from the same pass).

    Parameters
    ----------
    siglip_path, language_model_path
        Model directories or hub names. The ViT's weights come from ``siglip_path``
        unless ``load_pretrained=False``; only the config is read from ``language_model_path``.
    num_compressed_tokens
        Q, the number of learnable queries (64 in the published model).
    vision_config, language_config
        Build from config objects instead of paths (no download, random weights).
    projection_type
        ``"compressed"`` (the adapter) or ``"local"`` (no compression, Q = number of patches).
    adapter_mlp_dim
        Hidden width of the adapter's MLP (8192 in the published model).
    """

    def __init__(
        self,
        siglip_path: str | None = None,
        language_model_path: str | None = None,
        num_compressed_tokens: int = PUBLISHED_NUM_TOKENS,
        *,
        vision_config: SiglipVisionConfig | None = None,
        language_config: PretrainedConfig | None = None,
        projection_type: str = PROJECTION_COMPRESSED,
        adapter_mlp_dim: int = ADAPTER_MLP_DIM,
        load_pretrained: bool = True,
    ) -> None:
        super().__init__()
        if (siglip_path is None) == (vision_config is None):
            raise ValueError("give exactly one of siglip_path or vision_config")
        if (language_model_path is None) == (language_config is None):
            raise ValueError("give exactly one of language_model_path or language_config")
        language_config = language_config or load_language_config(language_model_path)
        if vision_config is None and load_pretrained:
            self.vision_encoder = SiglipVisionModel.from_pretrained(siglip_path)
        else:
            vision_config = vision_config or load_vision_config(siglip_path)
            self.vision_encoder = SiglipVisionModel(vision_config)
        self.vision_encoder.register_load_state_dict_pre_hook(accept_nested_siglip_names)
        vcfg = self.vision_encoder.config
        if projection_type == PROJECTION_COMPRESSED:
            self.vision_projection = TokenCompressionAdapter(
                vcfg.hidden_size,
                language_config.hidden_size,
                num_compressed_tokens,
                vcfg.num_attention_heads,
                vcfg.layer_norm_eps,
                language_config.hidden_act,
                adapter_mlp_dim,
            )
        elif projection_type == PROJECTION_LOCAL:
            if num_compressed_tokens != num_patches(vcfg):
                raise ValueError(
                    f"the local variant keeps all {num_patches(vcfg)} patch tokens; "
                    f"got num_compressed_tokens={num_compressed_tokens}"
                )
            self.vision_projection = local_projection(
                vcfg.hidden_size, language_config.hidden_size, language_config.hidden_act
            )
        else:
            raise ValueError(f"unknown projection_type {projection_type!r}")
        self.num_compressed_tokens = num_compressed_tokens
        self.projection_type = projection_type

    @property
    def image_size(self) -> int:
        return self.vision_encoder.config.image_size

    def encode(self, pixel_values: torch.Tensor) -> IndexingOutput:
        """Run the ViT once; return the compressed tokens and the normalised image embedding."""
        out = self.vision_encoder(pixel_values=pixel_values)
        tokens = self.vision_projection(out.last_hidden_state)
        embedding = nn.functional.normalize(out.pooler_output, dim=-1)
        return IndexingOutput(compressed_tokens=tokens, image_embedding=embedding)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return the compressed tokens, shape (B, Q, D_lm)."""
        return self.encode(pixel_values).compressed_tokens


def build_pair_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_image_tokens: int,
    image_token_id: int,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn text tokenizations ``[CLS] text [SEP] [PAD]...`` into pair layouts.

    Each row becomes ``[CLS] text [SEP] <image>xQ [SEP] [PAD]...`` (length L + Q + 1), with
    token types 0 over the text and 1 over the image part and its closing ``[SEP]``. The
    closing ``[SEP]`` repeats the id that ends the row's text.
    Returns ``(input_ids, attention_mask, token_type_ids)``.
    """
    batch, text_len = input_ids.shape
    lengths = attention_mask.long().sum(dim=1, keepdim=True)  # (B, 1)
    sep = input_ids.gather(1, lengths - 1)
    pos = torch.arange(text_len + num_image_tokens + 1, device=input_ids.device).unsqueeze(0)
    text_ids = input_ids.gather(1, pos.clamp(max=text_len - 1).expand(batch, -1))
    is_text = pos < lengths
    is_image = (pos >= lengths) & (pos < lengths + num_image_tokens)
    is_sep = pos == lengths + num_image_tokens
    ids = torch.where(is_text, text_ids, torch.full_like(text_ids, pad_token_id))
    ids = torch.where(is_image, torch.full_like(ids, image_token_id), ids)
    ids = torch.where(is_sep, sep.expand_as(ids), ids)
    mask = (pos <= lengths + num_image_tokens).long()
    types = (is_image | is_sep).long()
    return ids, mask.expand(batch, -1), types


class EDJEModelForRanking(nn.Module):
    """(text, compressed tokens) -> one matching logit per pair.

    Parameters
    ----------
    language_model_path
        MiniLM/BERT directory or hub name; weights loaded unless ``load_pretrained=False``.
    num_compressed_tokens
        Q, the number of image tokens per pair.
    language_config
        Build from a config object instead (no download, random weights).
    image_token_id
        Id of the added ``<image>`` token; defaults to the original vocabulary size.
    """

    def __init__(
        self,
        language_model_path: str | None = None,
        num_compressed_tokens: int = PUBLISHED_NUM_TOKENS,
        *,
        language_config: PretrainedConfig | None = None,
        image_token_id: int | None = None,
        load_pretrained: bool = True,
    ) -> None:
        super().__init__()
        if (language_model_path is None) == (language_config is None):
            raise ValueError("give exactly one of language_model_path or language_config")
        if language_config is None and load_pretrained:
            self.language_model = BertForMaskedLM.from_pretrained(language_model_path)
        else:
            # A copy: resizing the embeddings below must not change the caller's config.
            config = copy.deepcopy(language_config) or load_language_config(language_model_path)
            self.language_model = BertForMaskedLM(config)
        config = self.language_model.config
        self.image_token_id = config.vocab_size if image_token_id is None else image_token_id
        if self.image_token_id >= config.vocab_size:
            # One extra row for the added special token <image>.
            self.language_model.resize_token_embeddings(self.image_token_id + 1)
        self.num_compressed_tokens = num_compressed_tokens
        self._grow_position_table(MAX_TEXT_TOKENS + num_compressed_tokens)
        self.classification_head = nn.Sequential(
            BertPooler(config), nn.Linear(config.hidden_size, 1)
        )

    def _grow_position_table(self, needed: int) -> None:
        """Grow the position table (Local variant: 64 + 576 > 512), copying the last row."""
        embeddings = self.language_model.bert.embeddings
        old = embeddings.position_embeddings
        if needed <= old.num_embeddings:
            return
        new = nn.Embedding(needed, old.embedding_dim)
        with torch.no_grad():
            new.weight[: old.num_embeddings] = old.weight
            new.weight[old.num_embeddings :] = old.weight[-1]
        embeddings.position_embeddings = new
        embeddings.register_buffer(
            "position_ids", torch.arange(needed).expand((1, -1)), persistent=False
        )
        self.language_model.config.max_position_embeddings = needed

    def _encode_layouts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        compressed_tokens: torch.Tensor,
        output_attentions: bool = False,
    ):
        """The joint encoder over full pair layouts (the one embedding path of every entry)."""
        word_embeddings = self.language_model.bert.embeddings.word_embeddings
        is_image = input_ids == self.image_token_id
        slot = (torch.cumsum(is_image.long(), dim=1) - 1).clamp(0, compressed_tokens.shape[1] - 1)
        image_embeds = torch.gather(
            compressed_tokens.to(word_embeddings.weight.dtype),
            1,
            slot.unsqueeze(-1).expand(-1, -1, compressed_tokens.shape[-1]),
        )
        inputs_embeds = torch.where(
            is_image.unsqueeze(-1), image_embeds, word_embeddings(input_ids)
        )
        return self.language_model.bert(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_attentions=output_attentions,
        )

    def score_pairs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        compressed_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Score full pair layouts ``[CLS] text [SEP] <image>xQ [SEP] [PAD]...``.

        The k-th ``<image>`` position of each row receives that row's k-th compressed token.
        Returns logits of shape (B,).
        """
        hidden = self._encode_layouts(
            input_ids, attention_mask, token_type_ids, compressed_tokens
        ).last_hidden_state
        return self.classification_head(hidden).squeeze(-1)

    def pair_hidden_states(
        self,
        compressed_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        output_attentions: bool = False,
    ):
        """The joint encoder's output for text-only tokenizations paired with image tokens.

        Takes what :meth:`forward` takes (each row's Q image tokens go right after its text)
        and returns the BERT output: ``last_hidden_state`` (B, L + Q + 1, D), and with
        ``output_attentions`` (eager attention only) ``attentions``, one tensor per layer.
        Training's losses and the probes read the hidden states through this method.
        """
        pair_ids, pair_mask, pair_types = build_pair_layout(
            input_ids,
            attention_mask,
            compressed_tokens.shape[1],
            self.image_token_id,
            self.language_model.config.pad_token_id or 0,
        )
        return self._encode_layouts(
            pair_ids, pair_mask, pair_types, compressed_tokens, output_attentions
        )

    def forward(
        self,
        compressed_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score text-only tokenizations (as the seed's snippet passes them) against tokens.

        ``input_ids``/``attention_mask`` are ``[CLS] text [SEP] [PAD]...`` straight from the
        MiniLM tokenizer; each row's Q image tokens are placed right after its text.
        ``token_type_ids`` of the text, if given, must be all zero and is otherwise ignored.
        """
        if token_type_ids is not None and bool(token_type_ids.ne(0).any()):
            raise ValueError("forward() takes the text-only tokenization; use score_pairs()")
        hidden = self.pair_hidden_states(
            compressed_tokens, input_ids, attention_mask
        ).last_hidden_state
        return self.classification_head(hidden).squeeze(-1)


__all__ = [
    "EDJEModelForIndexing",
    "EDJEModelForRanking",
    "IndexingOutput",
    "TokenCompressionAdapter",
]
