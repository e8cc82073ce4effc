"""An independent reference for EDJE, written in the tests from DESIGN.md §2.

* :class:`ResearchEDJE` reproduces the research training module's attribute layout (the source
  of a ``{"model": state_dict}`` checkpoint), including training-only parts.
* :func:`reference_tokens` and :func:`reference_scores` compute EDJE's outputs from that state
  dict with plain torch ops and per-row Python loops; they share no code with ``edje.modeling``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, SiglipConfig, SiglipModel, SiglipVisionModel
from transformers.models.bert.modeling_bert import BertPooler


class ResearchAdapter(nn.Module):
    def __init__(self, dv: int, dl: int, q: int, heads: int, eps: float, mlp: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, q, dv))
        self.key = nn.Linear(dv, dv)
        self.value = nn.Linear(dv, dv)
        self.attention = nn.MultiheadAttention(dv, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(dv, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dv, mlp)
        self.mlp.fc2 = nn.Linear(mlp, dv)
        self.projection = nn.Linear(dv, dl)


class ResearchEDJE(nn.Module):
    """The research training module's parameter layout (random weights).

    Use :meth:`research_state_dict`: the research code ran a transformers release whose
    ``SiglipVisionModel`` nested its modules under ``vision_model`` (DESIGN.md §2).
    """

    def research_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k.replace("vision_encoder.", "vision_encoder.vision_model.", 1)
            if k.startswith("vision_encoder.") and not k.startswith("vision_encoder.vision_model.")
            else k: v
            for k, v in self.state_dict().items()
        }

    def __init__(
        self, siglip: SiglipConfig, language: BertConfig, q: int, mlp: int, local: bool = False
    ) -> None:
        super().__init__()
        v = siglip.vision_config
        self.vision_encoder = SiglipVisionModel(v)
        if local:
            self.vision_projection = nn.Sequential(
                nn.Linear(v.hidden_size, 8192), nn.GELU(), nn.Linear(8192, language.hidden_size)
            )
        else:
            self.vision_projection = ResearchAdapter(
                v.hidden_size, language.hidden_size, q, v.num_attention_heads, v.layer_norm_eps, mlp
            )
        self.language_model = BertForMaskedLM(copy.deepcopy(language))
        self.language_model.resize_token_embeddings(language.vocab_size + 1)
        self.classification_head = nn.Sequential(
            BertPooler(language), nn.Linear(language.hidden_size, 1)
        )
        self.text_projection = nn.Linear(language.hidden_size, siglip.text_config.hidden_size)
        self.clip = SiglipModel(siglip)
        with torch.no_grad():  # make every parameter matter (biases, LayerNorms, pooler)
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.02)


def _linear(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def _layer_norm(sd: dict, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _attention(q, k, v, heads: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    b, lq, d = q.shape
    hd = d // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, -1, heads, hd).transpose(1, 2)

    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)


def reference_tokens(sd: dict, patch_tokens: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """The adapter on the ViT's last hidden state, from the research state dict."""
    p = "vision_projection."
    x = patch_tokens
    query = sd[p + "query"].expand(x.shape[0], -1, -1)
    key, value = _linear(sd, p + "key", x), _linear(sd, p + "value", x)
    wq, wk, wv = sd[p + "attention.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[p + "attention.in_proj_bias"].chunk(3)
    h = _attention(query @ wq.T + bq, key @ wk.T + bk, value @ wv.T + bv, heads)
    h = _linear(sd, p + "attention.out_proj", h)
    m = _layer_norm(sd, p + "layernorm", h, eps)
    h = h + _linear(sd, p + "mlp.fc2", F.gelu(_linear(sd, p + "mlp.fc1", m)))
    return _linear(sd, p + "projection", h)


def reference_pair_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, q: int, image_id: int
) -> list[tuple[list[int], list[int]]]:
    """Per row: ([CLS] text [SEP] <image>xQ [SEP]) ids and token types, unpadded."""
    rows = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        text = ids[: sum(mask)]
        rows.append((text + [image_id] * q + [text[-1]], [0] * len(text) + [1] * (q + 1)))
    return rows


def reference_scores(
    sd: dict,
    config: BertConfig,
    tokens: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Matching logits, one row at a time (no padding at all), from plain ops."""
    p = "language_model.bert."
    q = tokens.shape[1]
    image_id = config.vocab_size
    eps = config.layer_norm_eps
    out = []
    for row, (ids, types) in enumerate(reference_pair_rows(input_ids, attention_mask, q, image_id)):
        emb = sd[p + "embeddings.word_embeddings.weight"][torch.tensor(ids)].clone()
        image_positions = [i for i, t in enumerate(ids) if t == image_id]
        emb[image_positions] = tokens[row].float()
        emb = emb + sd[p + "embeddings.position_embeddings.weight"][: len(ids)]
        emb = emb + sd[p + "embeddings.token_type_embeddings.weight"][torch.tensor(types)]
        h = _layer_norm(sd, p + "embeddings.LayerNorm", emb, eps)[None]
        for layer in range(config.num_hidden_layers):
            lp = f"{p}encoder.layer.{layer}."
            a = _attention(
                _linear(sd, lp + "attention.self.query", h),
                _linear(sd, lp + "attention.self.key", h),
                _linear(sd, lp + "attention.self.value", h),
                config.num_attention_heads,
            )
            h = _layer_norm(
                sd,
                lp + "attention.output.LayerNorm",
                _linear(sd, lp + "attention.output.dense", a) + h,
                eps,
            )
            i = F.gelu(_linear(sd, lp + "intermediate.dense", h))
            h = _layer_norm(
                sd, lp + "output.LayerNorm", _linear(sd, lp + "output.dense", i) + h, eps
            )
        pooled = torch.tanh(_linear(sd, "classification_head.0.dense", h[:, 0]))
        out.append(_linear(sd, "classification_head.1", pooled)[0, 0])
    return torch.stack(out)
