"""How stage two starts the adapter: on a grid of windows (the default), from the first stage's
pooling head, or at random; and with image tokens scaled to the joint encoder's words."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipModel

from edje.modeling import EDJEModelForRanking, TokenCompressionAdapter
from edje.training.recipe import StageTwo

log = logging.getLogger(__name__)


def start_adapter(
    cfg: StageTwo,
    adapter: TokenCompressionAdapter,
    ranking: EDJEModelForRanking,
    clip: SiglipModel,
    features: torch.Tensor,
) -> None:
    """Start ``adapter`` as ``cfg.adapter_init`` and ``cfg.image_token_scale`` say, fitting on
    a sample of frozen ViT features ``[N, P, Dv]``."""
    if cfg.adapter_init == "spatial":
        init_adapter_spatial(adapter, features)
    elif cfg.adapter_init == "head":
        init_adapter_from_head(adapter, clip, cfg.warm_start_adapter)
    if cfg.image_token_scale > 0:
        match_token_scale(adapter, ranking, features, cfg.image_token_scale)


@torch.no_grad()
def init_adapter_from_head(
    adapter: TokenCompressionAdapter, clip: SiglipModel, noise: float
) -> None:
    """Warm-start the adapter from the first stage's attention-pooling head.

    The head computes ``h = mha(probe, x, x); h = h + mlp(layernorm(h))``, the adapter
    ``h = mha(query, key(x), value(x)); h = h + mlp(layernorm(h))``. With key and value set to
    the identity, every query a noisy copy of the probe and the head's attention, layer norm and
    MLP copied, each of the Q tokens starts as (a perturbation of) the first-stage image
    embedding instead of a uniform average, and the queries then specialise in training.
    Parts whose shapes differ keep their random init.
    """
    head = clip.vision_model.head
    probe = head.probe.reshape(1, 1, -1)
    q, width = adapter.query.shape[1], adapter.query.shape[-1]
    if probe.shape[-1] != width:
        return
    scale = noise * probe.norm() / width**0.5
    adapter.query.copy_(probe + scale * torch.randn(1, q, width))
    for lin in (adapter.key, adapter.value):
        lin.weight.copy_(torch.eye(width))
        lin.bias.zero_()
    pairs = [(adapter.attention, head.attention), (adapter.layernorm, head.layernorm)]
    pairs += [(adapter.mlp.fc1, head.mlp.fc1), (adapter.mlp.fc2, head.mlp.fc2)]
    for dst, src in pairs:
        shapes = zip(dst.state_dict().values(), src.state_dict().values(), strict=True)
        if all(a.shape == b.shape for a, b in shapes):
            dst.load_state_dict(src.state_dict())
    log.info("adapter warm-started from the first stage's pooling head")


def init_adapter_spatial(
    adapter: TokenCompressionAdapter, features: torch.Tensor, sharpness: float = 1.0
) -> float:
    """Start each of the Q adapter queries attending to its own cell of a sqrt(Q) grid.

    A softmax classifier (fitted here, a few hundred steps) reads from each frozen ViT patch
    feature ``[N, P, Dv]`` which of the Q cells the patch lies in. The key projection is set to
    that read-out, in every attention head, and query ``i`` to ``sharpness`` times the one-hot of
    cell ``i``. Query ``i``'s attention logits over the patches are then the classifier's cell-i
    logits: a window on its cell. Value and output projections start as the identity, so token
    ``i`` starts as the mean patch feature of its cell and keeps *what* is there and *where*,
    which binding and relations need. Returns the read-out's accuracy on the patches.
    """
    n, p, width = features.shape
    q, heads = adapter.query.shape[1], adapter.attention.num_heads
    side, qside, head_dim = math.isqrt(p), math.isqrt(q), width // heads
    if side * side != p or qside * qside != q or side % qside or q > head_dim:
        raise ValueError(f"spatial init needs square grids and Q <= head dim (P={p}, Q={q})")
    row, col = torch.arange(p) // side, torch.arange(p) % side
    cell = (row // (side // qside)) * qside + col // (side // qside)  # [P]
    x = features.reshape(-1, width).float()
    target = cell.repeat(n)
    readout = nn.Linear(width, q)
    opt = torch.optim.Adam(readout.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(readout(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((readout(x).argmax(1) == target).float().mean())
        scale = sharpness * head_dim**0.5  # cancels MHA's 1/sqrt(head_dim)
        adapter.key.weight.zero_()
        adapter.key.bias.zero_()
        adapter.query.zero_()
        for h in range(heads):
            rows = slice(h * head_dim, h * head_dim + q)
            adapter.key.weight[rows] = readout.weight
            adapter.key.bias[rows] = readout.bias
            adapter.query[0, :, rows] = torch.eye(q) * scale
        eye = torch.eye(width)
        adapter.value.weight.copy_(eye)
        adapter.value.bias.zero_()
        attention = adapter.attention
        attention.in_proj_weight.copy_(torch.cat([eye, eye, eye]))
        attention.in_proj_bias.zero_()
        attention.out_proj.weight.copy_(eye)
        attention.out_proj.bias.zero_()
    log.info(f"adapter: spatial init, {qside}x{qside} grid (cell read-out accuracy {accuracy:.2f})")
    return accuracy


@torch.no_grad()
def match_token_scale(
    adapter: TokenCompressionAdapter,
    ranking: EDJEModelForRanking,
    features: torch.Tensor,
    ratio: float,
) -> float:
    """Rescale the adapter's output projection so image tokens start ``ratio`` times as large
    (std) as the joint encoder's word embeddings.

    A fresh projection emits tokens about 30x larger than BERT's N(0, 0.02) embeddings, so in
    the embedding layer norm the image positions' position and token-type embeddings vanish.
    Returns the factor applied."""
    words = ranking.language_model.bert.embeddings.word_embeddings.weight
    factor = ratio * float(words.std()) / float(adapter(features).std())
    adapter.projection.weight.mul_(factor)
    adapter.projection.bias.mul_(factor)
    log.info(f"adapter: image tokens scaled by {factor:.3f} to {ratio}x the word embeddings")
    return factor
