"""Train EDJE: the embedded default on the synthetic world, or fine-tune a model source.

Two stages (DESIGN.md §2, §6):

1. **First stage** (default only): a small transformers ``SiglipModel`` trained with the sigmoid
   loss (logit scale log(10), bias -10; captions that truly describe another image in the batch
   count as positives), plus two per-patch auxiliary losses on the ViT's last hidden state: the
   patch's grid position and its mix of objects from the renderer's label map. Its vision tower
   becomes EDJE's frozen ViT and its text tower the first-stage text search.
2. **EDJE** (adapter + joint encoder + head + ``text_projection``) on the frozen ViT's cached
   patch features. The adapter starts with query ``i`` attending to grid cell ``i``
   (:func:`init_adapter_spatial`). Losses:

   * ITM: binary cross-entropy on positives and negatives, plus a listwise cross-entropy over
     (positive, negatives) per caption and per image. Negatives mix hard ones *mined by the
     first stage* (its top-k images for a caption, top-k captions for an image) with random
     ones, under a curriculum that raises the hard share from 0 to ``max_hard_share`` and
     shrinks the mining depth from top-128 to top-8. On the synthetic world each positive also
     gets a *minimally edited* caption (:func:`edje.synthetic.edit_caption`) as a negative;
   * word-level contradiction (synthetic world): a training-only head marks which words of the
     edited caption the image contradicts;
   * ITC: the joint encoder's text-only ``[CLS]`` through ``text_projection`` regressed (cosine)
     onto the first stage's text embedding;
   * MLM on the captions through ``language_model.cls``, conditioned on the image (pair layout);
     on the synthetic world each caption masks *every* word of one kind (all its colours, say),
     so that only the image can answer;
   * grounding (synthetic world): the first heads of the first layers are taught, from the
     renderer's label maps, to look from each word of a noun phrase ("red", "circle") at the
     image cells that hold that object. Without it the encoder hardly used its image tokens;
   * optional distillation of the first stage's scores over each candidate list.

Commands (``python -m edje.train --help``)::

    # the embedded default (CPU, 2 cores: stage 1 ~5 min, stage 2 80 min on wall time, about
    # 87 min in all; --stage2-minutes 0 --stage2-steps N schedules on steps and is
    # deterministic). Writes TRAINING.md and training.json beside the weights.
    python -m edje.train default --out build_scripts/edje/default_model
    # quality on the held-out synthetic test split
    python -m edje.train evaluate --source build_scripts/edje/default_model
    # fine-tune a model source (e.g. the published checkpoint) on a Karpathy-format dataset;
    # on a GPU, for example:
    python -m edje.train finetune --source /models/edje-large --data coco/dataset_coco.json \\
        --image-root coco/images --out /models/edje-coco --device cuda --batch-size 128 \\
        --steps 20000 --lr 2e-5 --no-cache
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertTokenizerFast,
    DataCollatorForLanguageModeling,
    SiglipConfig,
    SiglipModel,
)

from edje import synthetic
from edje.checkpoint import to_research_layout
from edje.model_source import ModelSource
from edje.modeling import (
    EDJEModelForIndexing,
    EDJEModelForRanking,
    TokenCompressionAdapter,
    build_pair_layout,
)
from edje.tiny import make_vocab, save_checkpoint, siglip_processor

log = logging.getLogger("edje.train")


# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """Sizes and schedule of the embedded default (every number the result depends on)."""

    seed: int = 0
    # World
    image_size: int = 64
    images_per_scene: int = 4
    # First stage (SiglipModel)
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_len: int = 16
    stage1_steps: int = 800
    stage1_batch: int = 128
    stage1_lr: float = 1e-3
    # Auxiliary loss: predict each patch's grid position from the ViT's last hidden state, so
    # the frozen patch tokens keep *where* things are (the adapter needs it for relations).
    stage1_position_weight: float = 0.2
    # Auxiliary loss: each patch's mix of objects (colour x shape, from the renderer's label map).
    # The tiny ViT stands in for a web-scale SigLIP, which sees shapes. Linear probe of an
    # object's shape (3-way) from its mean patch feature (python -m edje.probes): 45% with the
    # sigmoid loss alone, 49% at weight 1, 88% at weight 5; colour is 100% throughout.
    stage1_object_weight: float = 5.0
    # EDJE
    num_compressed_tokens: int = 16
    adapter_mlp_dim: int = 512
    lm_width: int = 384
    lm_layers: int = 4
    lm_heads: int = 6
    lm_intermediate: int = 768
    lm_dropout: float = 0.0
    stage2: StageTwo = field(default_factory=lambda: StageTwo())


@dataclass
class StageTwo:
    """EDJE training schedule and loss weights."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    hard_k: int = 128  # hard negatives are drawn from the first stage's top-k ...
    hard_k_min: int = 8  # ... with k shrinking geometrically to this
    hard_k_decay: float = 0.7  # over this fraction of the steps
    curriculum: float = 0.3  # fraction of steps over which the hard share goes 0 -> max
    max_hard_share: float = 0.8
    itm_weight: float = 1.0
    rank_weight: float = 1.0
    itc_weight: float = 0.5
    mlm_weight: float = 1.0
    mlm_with_image: bool = True
    mlm_probability: float = 0.25
    distill_weight: float = 0.0
    # World captions only: per positive, a minimally edited caption (edje.synthetic.edit_caption)
    # as an ITM negative, and a per-word head that must find the edited words.
    edit_negatives: bool = True
    rtd_weight: float = 1.0
    distill_temperature: float = 0.1
    distill_until: float = 1.0  # the distillation weight falls linearly to 0 by this progress
    image_negatives: int = 1  # wrong images per positive caption (mined or random)
    # Share of those drawn from the caption's binding twins (synthetic world: its scene with
    # colours swapped, the relation flipped or counts swapped), the re-ranker's hardest case;
    # it rises with the hard share.
    twin_share: float = 0.0
    image_token_scale: float = 2.0  # > 0: start image tokens this many times the word std
    ground_weight: float = 1.0  # grounding loss on attention (synthetic world; 0: off)
    ground_heads: int = 2  # ... on the first this many heads ...
    ground_layers: int = 2  # ... of the first this many layers
    ground_relations: bool = False  # relation words too: each looks at the object it points at
    log_every: int = 20
    eval_every: int = 400
    eval_queries: int = 0  # 0: the whole validation split
    grad_clip: float = 5.0
    time_budget: float = 0.0  # seconds; if set, the schedule runs on wall time (steps = max)
    warm_start_adapter: float = 0.5  # query noise when starting from the pooling head (0: off)
    adapter_init: str = "spatial"  # "spatial" (a grid of windows), "head" (pooling head), "random"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_multiplier(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``progress`` 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class PairData:
    """Images and captions with groups: a caption matches exactly the images of its group.

    ``pixels`` is uint8 [N, 3, H, W] (or ``None`` when ``load_pixels`` reads on demand).
    """

    image_group: np.ndarray  # int [N]
    captions: list[str]
    caption_group: np.ndarray  # int [C]
    caption_kind: list[str]
    pixels: torch.Tensor | None = None
    load_pixels: Callable[[Sequence[int]], torch.Tensor] | None = None
    labels: torch.Tensor | None = None  # uint8 [N, H, W] object classes (synthetic world only)
    # int [N]: images whose scenes differ only in binding (swapped colours, flipped relation,
    # swapped counts) share a family (synthetic world only)
    image_family: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.images_of: dict[int, np.ndarray] = {}
        for g in np.unique(self.image_group):
            self.images_of[int(g)] = np.flatnonzero(self.image_group == g)
        # Per group, the images of its binding twins (same family, another group).
        self.twins_of: dict[int, np.ndarray] = {}
        if self.image_family is not None:
            for g, idx in self.images_of.items():
                family = self.image_family[idx[0]]
                twins = np.flatnonzero((self.image_family == family) & (self.image_group != g))
                if len(twins):
                    self.twins_of[g] = twins
        self.captions_of: dict[int, np.ndarray] = {}
        for g in np.unique(self.caption_group):
            self.captions_of[int(g)] = np.flatnonzero(self.caption_group == g)

    def pixel_values(self, idx: Sequence[int]) -> torch.Tensor:
        """Normalised pixels in [-1, 1] (SigLIP: scale 1/255, mean 0.5, std 0.5)."""
        if self.pixels is not None:
            return self.pixels[torch.as_tensor(np.asarray(idx))].float() / 127.5 - 1.0
        return self.load_pixels(idx)


def to_uint8(images: Sequence) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def world_data(split: str, seed: int, images_per_scene: int, all_templates: bool) -> PairData:
    """A synthetic split: ``images_per_scene`` images per scene; captions are every template
    (training) or one random caption per image (evaluation, one image per scene)."""
    examples = list(synthetic.generate(split, seed, images_per_scene=images_per_scene, labels=True))
    keys = sorted({ex.scene.key for ex in examples})
    group_of = {k: i for i, k in enumerate(keys)}
    image_group = np.array([group_of[ex.scene.key] for ex in examples])
    families = {g: i for i, g in enumerate(sorted({ex.scene.group for ex in examples}))}
    captions, caption_group, kinds = [], [], []
    if all_templates:
        scenes = {ex.scene.key: ex.scene for ex in examples}
        for key in keys:
            for text in synthetic.all_captions(scenes[key]):
                captions.append(text)
                caption_group.append(group_of[key])
                kinds.append(scenes[key].caption_kind)
    else:
        for ex in examples:
            captions += ex.captions
            caption_group += [group_of[ex.scene.key]] * len(ex.captions)
            kinds += [ex.kind] * len(ex.captions)
    return PairData(
        image_group,
        captions,
        np.array(caption_group),
        kinds,
        to_uint8([e.image for e in examples]),
        labels=torch.from_numpy(np.stack([e.labels for e in examples])),
        image_family=np.array([families[ex.scene.group] for ex in examples]),
    )


def karpathy_data(
    path: str | Path, split: str, image_root: str | Path | None, processor
) -> PairData:
    """A Karpathy-format split; every image is its own group; pixels are read on demand."""
    from PIL import Image

    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    files, groups, captions, caption_group, kinds = [], [], [], [], []
    for entry in json.loads(path.read_text())["images"]:
        if entry.get("split", split) != split:
            continue
        files.append(root / entry.get("filepath", "") / entry["filename"])
        groups.append(len(files) - 1)
        for sentence in entry["sentences"]:
            captions.append(sentence["raw"])
            caption_group.append(len(files) - 1)
            kinds.append(sentence.get("kind") or "plain")

    def load(idx: Sequence[int]) -> torch.Tensor:
        images = [Image.open(files[i]).convert("RGB") for i in idx]
        return processor(images=images, return_tensors="pt")["pixel_values"]

    return PairData(np.array(groups), captions, np.array(caption_group), kinds, load_pixels=load)


# --------------------------------------------------------------------------------------------
# Tokenizers and configs
# --------------------------------------------------------------------------------------------


def world_tokenizer(max_length: int) -> BertTokenizerFast:
    """WordPiece over the world's words (plus characters, so any text tokenizes)."""
    return BertTokenizerFast(
        vocab=make_vocab(synthetic.vocabulary()), do_lower_case=True, model_max_length=max_length
    )


def first_stage_config(
    recipe: Recipe, vocab_size: int, pad_id: int, bos_id: int = 2, eos_id: int = 3
) -> SiglipConfig:
    return SiglipConfig(
        vision_config=dict(
            image_size=recipe.image_size,
            patch_size=recipe.patch_size,
            hidden_size=recipe.vision_width,
            intermediate_size=recipe.vision_width * 4,
            num_hidden_layers=recipe.vision_layers,
            num_attention_heads=recipe.vision_heads,
        ),
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=recipe.text_width,
            intermediate_size=recipe.text_width * 4,
            num_hidden_layers=recipe.text_layers,
            num_attention_heads=4,
            max_position_embeddings=recipe.text_len,
            projection_size=recipe.vision_width,  # image and text embeddings share one space
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
        ),
    )


def language_config(recipe: Recipe, vocab_size: int) -> BertConfig:
    """MiniLM-like joint encoder config with the ORIGINAL vocabulary size."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.lm_width,
        num_hidden_layers=recipe.lm_layers,
        num_attention_heads=recipe.lm_heads,
        intermediate_size=recipe.lm_intermediate,
        max_position_embeddings=64 + recipe.num_compressed_tokens,
        hidden_act="gelu",
        hidden_dropout_prob=recipe.lm_dropout,
        attention_probs_dropout_prob=recipe.lm_dropout,
    )


# --------------------------------------------------------------------------------------------
# Stage 1: first-stage dual encoder
# --------------------------------------------------------------------------------------------


def new_first_stage(config: SiglipConfig) -> SiglipModel:
    """A SiglipModel with the SigLIP paper's start: logit scale log(10), bias -10."""
    clip = SiglipModel(config)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(10.0))
        clip.logit_bias.fill_(-10.0)
    return clip


@torch.no_grad()
def embed_images(clip: SiglipModel, data: PairData, batch: int = 256):
    """Normalised first-stage image embeddings [N, E] and ViT patch features [N, P, Dv] fp16."""
    clip.eval()
    embs, feats = [], []
    for start in range(0, len(data.image_group), batch):
        idx = range(start, min(start + batch, len(data.image_group)))
        out = clip.vision_model(pixel_values=data.pixel_values(idx))
        embs.append(F.normalize(out.pooler_output, dim=-1))
        feats.append(out.last_hidden_state.half())
    return torch.cat(embs), torch.cat(feats)


@torch.no_grad()
def embed_texts(text_model, tokenizer, texts: Sequence[str], max_length: int, batch: int = 512):
    """Normalised first-stage text embeddings; ids padded to ``max_length`` (as SigLIP)."""
    text_model.eval()
    out = []
    for start in range(0, len(texts), batch):
        ids = tokenizer(
            list(texts[start : start + batch]),
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        )["input_ids"]
        out.append(F.normalize(text_model(input_ids=ids).pooler_output, dim=-1))
    return torch.cat(out)


def recall_at(sim: torch.Tensor, caption_group: np.ndarray, image_group: np.ndarray, ks=(1, 10)):
    """Text->image R@K (percent) from a [C, N] similarity matrix."""
    order = sim.argsort(dim=1, descending=True)
    hits = torch.from_numpy(image_group)[order] == torch.from_numpy(caption_group)[:, None]
    first = torch.where(
        hits.any(1), hits.float().argmax(1), torch.full_like(hits[:, 0], 10**9, dtype=torch.long)
    )
    return {f"R@{k}": float(100 * (first < k).float().mean()) for k in ks}


def train_first_stage(
    clip: SiglipModel, tokenizer, data: PairData, val: PairData, recipe: Recipe
) -> dict[str, float]:
    """Sigmoid-loss training of the dual encoder; returns final validation recall."""
    vision = clip.config.vision_config
    num_patches = (vision.image_size // vision.patch_size) ** 2
    position_head = nn.Linear(vision.hidden_size, num_patches)
    object_head = nn.Linear(vision.hidden_size, synthetic.NUM_OBJECT_CLASSES)
    use_objects = recipe.stage1_object_weight > 0 and data.labels is not None
    params = [*clip.parameters(), *position_head.parameters(), *object_head.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.stage1_lr, weight_decay=0.05)
    rng = np.random.default_rng(recipe.seed)
    n, b = len(data.image_group), recipe.stage1_batch
    t0, seen = time.time(), 0
    for step in range(recipe.stage1_steps):
        clip.train()
        for g in opt.param_groups:
            g["lr"] = recipe.stage1_lr * cosine_lr(step, recipe.stage1_steps, 100)
        idx = rng.choice(n, size=b, replace=False)
        groups = data.image_group[idx]
        caps = [data.captions[rng.choice(data.captions_of[int(g)])] for g in groups]
        ids = tokenizer(
            caps,
            padding="max_length",
            max_length=recipe.text_len,
            truncation=True,
            return_tensors="pt",
        )["input_ids"]
        out = clip(input_ids=ids, pixel_values=data.pixel_values(idx))
        labels = torch.from_numpy(2.0 * (groups[:, None] == groups[None, :]) - 1.0).float()
        loss = -F.logsigmoid(labels * out.logits_per_text).sum() / b
        patches = out.vision_model_output.last_hidden_state
        position = objects = torch.zeros(())
        if recipe.stage1_position_weight > 0:
            target = torch.arange(num_patches).expand(b, -1)
            position = F.cross_entropy(position_head(patches).flatten(0, 1), target.flatten())
        if use_objects:
            mix = patch_object_mix(data.labels[torch.as_tensor(idx)], vision.patch_size)
            objects = F.cross_entropy(object_head(patches).flatten(0, 1), mix.flatten(0, 1))
        opt.zero_grad(set_to_none=True)
        aux = recipe.stage1_position_weight * position + recipe.stage1_object_weight * objects
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seen += b
        if step % 50 == 0 or step == recipe.stage1_steps - 1:
            msg = (
                f"stage1 step {step}/{recipe.stage1_steps} loss {loss.item():.3f} "
                f"position {position.item():.3f} objects {objects.item():.3f} "
                f"scale {clip.logit_scale.exp().item():.1f} bias {clip.logit_bias.item():.1f} "
                f"{seen / (time.time() - t0):.0f} pairs/s"
            )
            if step % 250 == 0 or step == recipe.stage1_steps - 1:
                rec = first_stage_recall(clip, tokenizer, val, recipe.text_len)
                msg += f" | val R@1 {rec['R@1']:.1f} R@10 {rec['R@10']:.1f}"
            log.info(msg)
    return first_stage_recall(clip, tokenizer, val, recipe.text_len)


def patch_object_mix(labels: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch share of each object class: uint8 ``[B, H, W]`` -> ``[B, P, C]`` (rows sum 1)."""
    one_hot = F.one_hot(labels.long(), synthetic.NUM_OBJECT_CLASSES).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(one_hot, patch).flatten(2).transpose(1, 2)


def first_stage_recall(clip, tokenizer, val: PairData, text_len: int) -> dict[str, float]:
    img, _ = embed_images(clip, val)
    txt = embed_texts(clip.text_model, tokenizer, val.captions, text_len)
    return recall_at(txt @ img.T, val.caption_group, val.image_group)


# --------------------------------------------------------------------------------------------
# Stage 2: EDJE
# --------------------------------------------------------------------------------------------


class Features:
    """Frozen ViT patch features: cached once (``cache=True``) or computed per batch."""

    def __init__(self, vision_encoder: nn.Module, data: PairData, cache: bool, device) -> None:
        self.vision_encoder, self.data, self.device = vision_encoder.eval(), data, device
        self.cached = None
        if cache:
            feats = []
            with torch.no_grad():
                for start in range(0, len(data.image_group), 256):
                    idx = range(start, min(start + 256, len(data.image_group)))
                    out = vision_encoder(pixel_values=data.pixel_values(idx).to(device))
                    feats.append(out.last_hidden_state.half().cpu())
            self.cached = torch.cat(feats)

    @torch.no_grad()
    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[torch.as_tensor(np.asarray(idx))].to(self.device).float()
        pixels = self.data.pixel_values(idx).to(self.device)
        return self.vision_encoder(pixel_values=pixels).last_hidden_state.float()


@torch.no_grad()
def mine_hard(
    caption_emb: torch.Tensor, image_emb: torch.Tensor, data: PairData, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-stage hard negatives: top-k wrong images per caption and captions per image."""
    cg, ig = torch.from_numpy(data.caption_group), torch.from_numpy(data.image_group)

    def topk(query, keys, qg, kg):
        out = []
        for start in range(0, len(query), 2048):
            sim = query[start : start + 2048] @ keys.T
            sim[qg[start : start + 2048, None] == kg[None, :]] = -2.0  # never a positive
            out.append(sim.topk(min(k, len(keys) - 1), dim=1).indices)
        return torch.cat(out)

    return topk(caption_emb, image_emb, cg, ig), topk(image_emb, caption_emb, ig, cg)


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


def word_group_ids(tokenizer, groups: Sequence[Sequence[str]]) -> torch.Tensor:
    """Per vocabulary id, the index of the word group it belongs to, or -1 (words the
    tokenizer does not know are left out)."""
    group_of = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for g, words in enumerate(groups):
        ids = tokenizer.convert_tokens_to_ids(list(words))
        group_of[[i for i in ids if i != tokenizer.unk_token_id]] = g
    return group_of


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


def pair_hidden(
    ranking: EDJEModelForRanking,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    output_attentions: bool = False,
):
    """Last hidden states of pair layouts (same embedding path as ``score_pairs``); with
    ``output_attentions`` (eager attention only), ``(hidden, per-layer attentions)``."""
    ids, mask, types = build_pair_layout(
        input_ids, attention_mask, tokens.shape[1], ranking.image_token_id, 0
    )
    words = ranking.language_model.bert.embeddings.word_embeddings
    is_image = ids == ranking.image_token_id
    slot = (torch.cumsum(is_image.long(), dim=1) - 1).clamp(0, tokens.shape[1] - 1)
    image_embeds = torch.gather(tokens, 1, slot.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    embeds = torch.where(is_image.unsqueeze(-1), image_embeds, words(ids))
    out = ranking.language_model.bert(
        inputs_embeds=embeds,
        attention_mask=mask,
        token_type_ids=types,
        output_attentions=output_attentions,
    )
    return (out.last_hidden_state, out.attentions) if output_attentions else out.last_hidden_state


class EDJETrainer:
    """Stage-2 training of adapter + joint encoder + head + text projection."""

    def __init__(
        self,
        indexing: EDJEModelForIndexing,
        ranking: EDJEModelForRanking,
        text_projection: nn.Linear,
        tokenizer,
        data: PairData,
        features: Features,
        caption_emb: torch.Tensor,
        image_emb: torch.Tensor,
        cfg: StageTwo,
        seed: int = 0,
        device: str | torch.device = "cpu",
        caption_editor: Callable[[str, random.Random], tuple[str, list[int]] | None] | None = None,
        mlm_groups: Sequence[Sequence[str]] | None = None,
        phrase_classes: Callable[[str], list[int]] | None = None,
    ) -> None:
        self.indexing, self.ranking, self.text_projection = indexing, ranking, text_projection
        self.editor = caption_editor if cfg.edit_negatives else None
        self.edit_rng = random.Random(seed)
        self.tokenizer, self.data, self.features, self.cfg = tokenizer, data, features, cfg
        self.device = torch.device(device)
        self.caption_emb, self.image_emb = caption_emb, image_emb
        self.hard_images, self.hard_captions = mine_hard(caption_emb, image_emb, data, cfg.hard_k)
        self.rng = np.random.default_rng(seed)
        self.masker = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=cfg.mlm_probability, seed=seed
        )
        # MLM: given word groups (edje.synthetic.WORD_GROUPS), each caption masks every word of
        # one group it uses, so the image must answer (which colour is the circle?); otherwise
        # the collator's random 15%-style masking of any word.
        self.word_group = None
        if mlm_groups is not None:
            self.word_group = word_group_ids(tokenizer, mlm_groups)
            self.num_groups = len(mlm_groups)
        # Grounding (synthetic world): the first heads of the first layers learn to look from
        # a noun phrase's words at the image cells that hold its object (label maps).
        self.phrase_classes = phrase_classes if cfg.ground_weight > 0 else None
        if self.phrase_classes is not None:
            q = indexing.vision_projection.query.shape[1]
            if data.labels is None or math.isqrt(q) ** 2 != q:
                raise ValueError("grounding needs label maps and a square grid of Q tokens")
            ranking.language_model.set_attn_implementation("eager")
        self.params = [
            *indexing.vision_projection.parameters(),
            *ranking.parameters(),
            *text_projection.parameters(),
        ]
        if self.editor is not None:
            # Training-only head: which words of a pair does the image contradict?
            hidden = ranking.language_model.config.hidden_size
            self.rtd_head = nn.Linear(hidden, 1).to(self.device)
            self.params += list(self.rtd_head.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.started = time.time()

    def progress(self) -> float:
        """Fraction of training done: by steps, or by wall time when ``time_budget`` is set."""
        done = self.step / self.cfg.steps
        if self.cfg.time_budget > 0:
            done = max(done, (time.time() - self.started) / self.cfg.time_budget)
        return min(1.0, done)

    def hard_share(self) -> float:
        """Share of negatives drawn from the first stage's top-k (the rest are random)."""
        ramp = self.cfg.curriculum
        share = 1.0 if ramp <= 0 else min(1.0, self.progress() / ramp)
        return share * self.cfg.max_hard_share

    def distill_weight(self) -> float:
        """Distillation weight now: ``distill_weight`` falling to 0 at ``distill_until``."""
        cfg = self.cfg
        return cfg.distill_weight * max(0.0, 1.0 - self.progress() / max(1e-9, cfg.distill_until))

    def hard_k(self) -> int:
        """How deep in the first stage's ranking hard negatives are drawn (shrinks in training)."""
        cfg = self.cfg
        progress = min(1.0, self.progress() / max(1e-9, cfg.hard_k_decay))
        k = cfg.hard_k * (cfg.hard_k_min / cfg.hard_k) ** progress
        return max(1, min(int(round(k)), self.hard_images.shape[1]))

    def _random_image(self, group: int) -> int:
        while True:
            i = int(self.rng.integers(len(self.data.image_group)))
            if self.data.image_group[i] != group:
                return i

    def _random_caption(self, group: int) -> int:
        while True:
            c = int(self.rng.integers(len(self.data.captions)))
            if self.data.caption_group[c] != group:
                return c

    def _wrong_image(self, c: int, g: int, mined: Iterator[int], p: float) -> int:
        """A wrong image for caption ``c`` (group ``g``): a binding twin with probability
        ``twin_share`` (scaled like the hard share), else mined with probability ``p``, else
        random."""
        twins = self.data.twins_of.get(g)
        share = self.cfg.twin_share * p / max(self.cfg.max_hard_share, 1e-9)
        if twins is not None and self.rng.random() < share:
            return int(self.rng.choice(twins))
        if self.rng.random() < p:
            return int(self.hard_images[c, next(mined)])
        return self._random_image(g)

    def sample(self) -> dict[str, np.ndarray]:
        """Per positive (caption c, image i): ``image_negatives`` wrong images for c, each a
        binding twin, mined (from the first stage's top-k, without repeats) or random; a
        hard-or-random wrong caption for i; and, without a caption editor, one more random
        wrong image for c."""
        cfg = self.cfg
        b, p, k, n = cfg.batch_size, self.hard_share(), self.hard_k(), cfg.image_negatives
        cap = self.rng.integers(len(self.data.captions), size=b)
        groups = self.data.caption_group[cap]
        img = np.array([self.rng.choice(self.data.images_of[int(g)]) for g in groups])
        neg_img, rand_img, neg_cap = [], [], []
        for c, i, g in zip(cap, img, groups, strict=True):
            mined = iter(self.rng.permutation(k) if k >= n else self.rng.integers(k, size=n))
            neg_img.append([self._wrong_image(c, int(g), mined, p) for _ in range(n)])
            if self.editor is None:
                rand_img.append(self._random_image(g))
            neg_cap.append(
                int(self.hard_captions[i, self.rng.integers(k)])
                if self.rng.random() < p
                else self._random_caption(g)
            )
        batch = dict(
            cap=cap,
            img=img,
            neg_img=np.array(neg_img).reshape(b, n),
            rand_img=np.array(rand_img, dtype=np.int64),
            neg_cap=np.array(neg_cap),
        )
        if self.editor is not None:
            edits = [self.editor(self.data.captions[c], self.edit_rng) for c in cap]
            batch["edit_ok"] = np.array([e is not None for e in edits])
            batch["edit_text"] = [
                e[0] if e else self.data.captions[c] for e, c in zip(edits, cap, strict=True)
            ]
            batch["edit_words"] = [e[1] if e else [] for e in edits]
        return batch

    def _mask(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM inputs and labels (-100: not masked) for text-only tokenizations."""
        if self.word_group is None:
            tok = self.tokenizer
            special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (mask == 0)
            return self.masker.torch_mask_tokens(ids.clone(), special)
        group = self.word_group[ids]  # [B, L], -1 for words outside every group
        present = F.one_hot(group + 1, self.num_groups + 1)[..., 1:].amax(1).float()  # [B, G]
        chosen = torch.full((len(ids),), -2)
        rows = present.sum(1) > 0
        picks = torch.from_numpy(self.rng.random(int(rows.sum()))).float()
        # Uniform among the groups each caption uses: the first group whose cumulative share
        # exceeds a uniform draw.
        share = present[rows].cumsum(1) / present[rows].sum(1, keepdim=True)
        chosen[rows] = (share < picks[:, None]).sum(1)
        hit = group == chosen[:, None]
        labels = torch.where(hit, ids, torch.full_like(ids, -100))
        return torch.where(hit, torch.full_like(ids, self.tokenizer.mask_token_id), ids), labels

    def _grounding(self, batch: dict, enc, mask: torch.Tensor, attentions) -> torch.Tensor:
        """Cross-entropy of the grounding heads' attention (positive pairs, rows ``:B``) from
        each phrase word to the image cells, against the share of the phrase's object in each
        cell. ``enc`` is the positives' tokenization, ``mask`` its padded attention mask."""
        b, cfg = len(batch["cap"]), self.cfg
        q = self.indexing.vision_projection.query.shape[1]
        cell = self.data.labels.shape[-1] // math.isqrt(q)
        mix = patch_object_mix(self.data.labels[torch.as_tensor(batch["img"])], cell)  # [B,Q,C]
        length = mask.shape[1]
        classes = torch.zeros(b, length, dtype=torch.long)
        for row, c in enumerate(batch["cap"]):
            per_word = self.phrase_classes(self.data.captions[c])
            for t, w in enumerate(enc.word_ids(row)[:length]):
                if w is not None:
                    classes[row, t] = per_word[w]
        if cfg.ground_relations:
            classes = self._relation_targets(batch, enc, classes, length)
        target = torch.gather(mix, 2, classes[:, None, :].expand(-1, q, -1)).transpose(1, 2)
        total = target.sum(-1, keepdim=True)  # [B, L, 1]
        valid = (classes > 0) & (total.squeeze(-1) > 0)
        if not valid.any():
            return mask.new_zeros((), dtype=torch.float)
        target = (target / total.clamp_min(1e-9)).to(self.device)
        lengths = mask.long().sum(1)  # text length of each pair row; its image follows
        cols = (lengths[:, None] + torch.arange(q, device=self.device))[:, None, :]  # [B,1,Q]
        loss = []
        for layer in attentions[: cfg.ground_layers]:
            att = layer[:b, : cfg.ground_heads, :length]  # [B, H, L, T]
            att = torch.gather(att, 3, cols[:, None].expand(-1, att.shape[1], length, -1))
            ce = -(target[:, None] * torch.log(att + 1e-9)).sum(-1)  # [B, H, L]
            loss.append(ce.permute(0, 2, 1)[valid.to(self.device)].mean())
        return torch.stack(loss).mean()

    def _relation_targets(self, batch: dict, enc, classes: torch.Tensor, length: int):
        """Give each relation word ("left", "above", ...) of a two-object caption the class of
        the object it points at in this image (label-map centroids), so that a grounding head
        learns *where*: "left" looks at whatever is further left."""
        labels = self.data.labels[torch.as_tensor(batch["img"])]
        size = labels.shape[-1]
        coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"))
        for row, c in enumerate(batch["cap"]):
            present = sorted({int(k) for k in classes[row].tolist() if k > 0})
            if len(present) != 2:  # needs two objects of different classes
                continue
            centre = []
            for k in present:
                where = labels[row] == k
                if not where.any():
                    break
                centre.append(coords[:, where].float().mean(1))  # (y, x)
            if len(centre) != 2:
                continue
            words = self.data.captions[c].split()
            for t, w in enumerate(enc.word_ids(row)[:length]):
                if w is None or words[w] not in synthetic.RELATION_POINTS:
                    continue
                axis, sign = synthetic.RELATION_POINTS[words[w]]
                further = int(sign * (centre[1][axis] - centre[0][axis]) > 0)
                classes[row, t] = present[further]
        return classes

    def _tokenize(self, idx):
        """``(input_ids, attention_mask, encoding)`` of the captions ``idx``."""
        enc = self._encode([self.data.captions[i] for i in idx])
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), enc

    def _encode(self, texts: list[str]):
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
        )

    def _edited(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edited captions (ids, mask) and per-token labels (1: an edited word)."""
        enc = self._encode(batch["edit_text"])
        labels = torch.zeros(enc["input_ids"].shape)
        for row, changed in enumerate(batch["edit_words"]):
            for t, w in enumerate(enc.word_ids(row)):
                if w is not None and w in changed:
                    labels[row, t] = 1.0
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        return ids, mask, labels

    def losses(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        b, n = batch["neg_img"].shape
        edit = self.editor is not None
        images = np.concatenate(
            [batch["img"], batch["neg_img"].T.reshape(-1)] + ([] if edit else [batch["rand_img"]])
        )
        tokens = self.indexing.vision_projection(self.features(images))  # [(n + 1 or 2) B, Q, D]
        pos_tok, *neg_tok = tokens.split(b)
        ids, mask, enc = self._tokenize(batch["cap"])
        if edit:
            third_ids, third_mask, edit_labels = self._edited(batch)
            third_tok = pos_tok  # (edited caption, its image)
        else:
            third_ids, third_mask, third_tok = ids, mask, neg_tok.pop()  # (caption, random image)
        neg_ids, neg_mask, _ = self._tokenize(batch["neg_cap"])
        length = max(ids.shape[1], neg_ids.shape[1], third_ids.shape[1])
        if edit:
            edit_labels = _pad_to(edit_labels, length)
        ids, mask, third_ids, third_mask = (
            _pad_to(t, length) for t in (ids, mask, third_ids, third_mask)
        )
        # Rows: (c, i), (c, neg_img_j) for j < n, (edited c, i) or (c, rand_img), (neg_cap, i)
        rows = n + 3
        all_ids = torch.cat([ids] * (n + 1) + [third_ids, _pad_to(neg_ids, length)])
        all_mask = torch.cat([mask] * (n + 1) + [third_mask, _pad_to(neg_mask, length)])
        all_tok = torch.cat([pos_tok, *neg_tok, third_tok, pos_tok])
        ground = self.phrase_classes is not None
        hidden = pair_hidden(self.ranking, all_ids, all_mask, all_tok, output_attentions=ground)
        if ground:
            hidden, attentions = hidden
        logits = self.ranking.classification_head(hidden).squeeze(-1).view(rows, b)
        labels = torch.zeros_like(logits)
        labels[0] = 1.0
        keep = torch.ones_like(logits)
        if edit:  # an edit that found nothing to change leaves a positive: leave it out
            keep[n + 1] = torch.from_numpy(batch["edit_ok"]).float()
        zero = torch.zeros(b, dtype=torch.long, device=self.device)
        image_side = list(range(n + 1)) + ([] if edit else [n + 1])
        caption_side = [0, n + 1, n + 2] if edit else [0, n + 2]
        kept = logits + (keep - 1) * 1e4  # left-out rows can never win
        out = {
            "itm": F.binary_cross_entropy_with_logits(
                logits, labels, weight=keep, pos_weight=torch.tensor(rows - 1.0, device=self.device)
            ),
            # Listwise: the caption's own image among its image candidates, and the image's
            # own caption among its caption candidates.
            "rank": F.cross_entropy(logits[image_side].T, zero)
            + F.cross_entropy(kept[caption_side].T, zero),
        }
        if edit:
            # Which words does the image contradict? Rows: the positive (none) and the edit.
            text_len = ids.shape[1]
            word_logits = self.rtd_head(
                hidden.view(rows, b, -1, hidden.shape[-1])[[0, n + 1], :, :text_len]
            )
            word_mask = torch.stack([mask, third_mask]).float()
            word_mask[1] *= keep[n + 1][:, None]
            word_labels = torch.stack([torch.zeros_like(edit_labels), edit_labels]).to(self.device)
            out["rtd"] = (
                F.binary_cross_entropy_with_logits(
                    word_logits.squeeze(-1), word_labels, reduction="none"
                )
                * word_mask
            ).sum() / word_mask.sum()
        if ground:
            out["ground"] = self._grounding(batch, enc, mask, attentions)
        out["acc"] = (logits[0] > kept[1:].max(0).values).float().mean().detach()
        # ITC: text-only [CLS] -> text_projection ~ first-stage text embedding.
        cls = self.ranking.language_model.bert(
            input_ids=ids, attention_mask=mask
        ).last_hidden_state[:, 0]
        target = self.caption_emb[torch.as_tensor(batch["cap"])].to(self.device)
        out["itc"] = (1 - F.cosine_similarity(self.text_projection(cls), target)).mean()
        # MLM on the captions (conditioned on the matching image unless disabled).
        masked, mlm_labels = self._mask(ids.cpu(), mask.cpu())
        masked, mlm_labels = masked.to(self.device), mlm_labels.to(self.device)
        if (mlm_labels >= 0).any():
            if self.cfg.mlm_with_image:
                h = pair_hidden(self.ranking, masked, mask, pos_tok)[:, : ids.shape[1]]
            else:
                h = self.ranking.language_model.bert(
                    input_ids=masked, attention_mask=mask
                ).last_hidden_state
            mlm_logits = self.ranking.language_model.cls(h)
            out["mlm"] = F.cross_entropy(
                mlm_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=-100
            )
        else:
            out["mlm"] = logits.new_zeros(())
        if self.cfg.distill_weight > 0:
            # The first stage's softmax over the same image candidates: its ranking of the
            # twins is a dense target while the joint encoder learns what it already knows.
            cand = np.concatenate([batch["img"][:, None], batch["neg_img"]], axis=1)
            if not edit:
                cand = np.concatenate([cand, batch["rand_img"][:, None]], axis=1)
            teacher = (
                target[:, None, :] * self.image_emb[torch.as_tensor(cand)].to(self.device)
            ).sum(-1)
            out["distill"] = F.kl_div(
                F.log_softmax(logits[image_side].T, dim=1),
                F.softmax(teacher / self.cfg.distill_temperature, dim=1),
                reduction="batchmean",
            )
        return out

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * lr_multiplier(self.step, self.progress(), cfg.warmup)
        self.indexing.vision_projection.train()
        self.ranking.train()
        out = self.losses(self.sample())
        loss = (
            cfg.itm_weight * out["itm"]
            + cfg.rank_weight * out["rank"]
            + cfg.itc_weight * out["itc"]
            + cfg.mlm_weight * out["mlm"]
            + self.distill_weight() * out.get("distill", 0.0)
            + cfg.rtd_weight * out.get("rtd", 0.0)
            + cfg.ground_weight * out.get("ground", 0.0)
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in out.items()} | {"loss": float(loss.detach())}

    def fit(self, validate: Callable[[], dict] | None = None) -> list[dict[str, float]]:
        """Train ``cfg.steps`` steps, logging running means and validation now and then."""
        history, running, t0 = [], {}, time.time()
        self.started = t0
        while self.progress() < 1.0:
            stats = self.train_step()
            history.append(stats)
            for k, v in stats.items():
                running.setdefault(k, []).append(v)
            s = self.step
            last = self.progress() >= 1.0
            if s % self.cfg.log_every == 0 or last:
                per_positive = self.cfg.image_negatives + 3 + int(self.cfg.mlm_with_image)
                pairs = s * self.cfg.batch_size * per_positive
                means = " ".join(f"{k} {np.mean(v):.3f}" for k, v in running.items())
                log.info(
                    f"stage2 step {s}/{self.cfg.steps} {means} "
                    f"hard {self.hard_share():.2f}@top{self.hard_k()} "
                    f"{pairs / (time.time() - t0):.0f} pair-passes/s"
                )
                running = {}
            if validate and (s % self.cfg.eval_every == 0 or last):
                log.info(f"stage2 step {s} validation: {validate()}")
        return history


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    if t.shape[1] >= length:
        return t[:, :length] if t.shape[1] > length else t
    return F.pad(t, (0, length - t.shape[1]))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def rerank_recall(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    captions: Sequence[str],
    caption_group: np.ndarray,
    image_group: np.ndarray,
    kinds: Sequence[str],
    score: Callable[[Sequence[str], torch.Tensor], torch.Tensor],
    top_k: int = 10,
    max_queries: int | None = None,
    show: int = 0,
) -> dict:
    """First-stage R@1/R@10 vs R@1 after re-ranking the top ``top_k`` with ``score``.

    ``score(texts, image_indices [n, k]) -> logits [n, k]``. Reports overall, per kind and
    over the hard subset (:data:`edje.synthetic.HARD_KINDS`).
    """
    n = len(captions) if max_queries is None else min(max_queries, len(captions))
    sim = text_emb[:n] @ image_emb.T
    order = sim.argsort(dim=1, descending=True)
    top = order[:, :top_k]
    logits = torch.cat(
        [score(captions[s : min(s + 16, n)], top[s : s + 16]) for s in range(0, n, 16)]
    )
    reranked = top.gather(1, logits.argsort(dim=1, descending=True))
    groups = torch.from_numpy(image_group)
    want = torch.from_numpy(caption_group[:n])[:, None]
    first_hit = groups[order[:, :1]].eq(want).any(1)
    r10 = groups[top].eq(want).any(1)
    re_hit = groups[reranked[:, :1]].eq(want).any(1)
    kinds = np.asarray(kinds[:n])
    hard = torch.from_numpy(np.isin(kinds, synthetic.HARD_KINDS))

    def pct(x, m=None):
        x = x if m is None else x[m]
        return round(float(100 * x.float().mean()), 1) if len(x) else float("nan")

    report = {
        "queries": n,
        "gallery": len(image_group),
        "first_stage_R@1": pct(first_hit),
        "first_stage_R@10": pct(r10),
        "reranked_R@1": pct(re_hit),
        "hard_queries": int(hard.sum()),
        "hard_first_stage_R@1": pct(first_hit, hard),
        "hard_reranked_R@1": pct(re_hit, hard),
        "by_kind": {
            k: {
                "n": int((kinds == k).sum()),
                "first_stage_R@1": pct(first_hit, torch.from_numpy(kinds == k)),
                "reranked_R@1": pct(re_hit, torch.from_numpy(kinds == k)),
            }
            for k in sorted(set(kinds))
        },
    }
    report["gain_R@1"] = round(report["reranked_R@1"] - report["first_stage_R@1"], 1)
    fixed = torch.nonzero(re_hit & ~first_hit).flatten().tolist()
    report["examples_fixed"] = [
        {
            "query": captions[q],
            "first_stage_top1": int(order[q, 0]),
            "reranked_top1": int(reranked[q, 0]),
        }
        for q in fixed[:show]
    ]
    return report


def ranker_scorer(indexing, ranking, tokenizer, features_or_tokens, device="cpu"):
    """``score(texts, image_idx)`` for :func:`rerank_recall` from image tokens or ViT features."""

    def tokens_for(idx: torch.Tensor) -> torch.Tensor:
        flat = idx.flatten().tolist()
        if isinstance(features_or_tokens, torch.Tensor):
            return features_or_tokens[flat].to(device).float()
        return indexing.vision_projection(features_or_tokens(flat))

    def score(texts: Sequence[str], idx: torch.Tensor) -> torch.Tensor:
        k = idx.shape[1]
        enc = tokenizer(
            list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        ids = enc["input_ids"].repeat_interleave(k, 0).to(device)
        mask = enc["attention_mask"].repeat_interleave(k, 0).to(device)
        return ranking(tokens_for(idx), ids, mask).view(len(texts), k).float().cpu()

    return score


def evaluate(
    source: str | Path | ModelSource = "build_scripts/edje/default_model",
    split: str = "test",
    seed: int = 0,
    top_k: int = 10,
    max_queries: int | None = None,
    show: int = 5,
) -> dict:
    """Text->image R@1 on a synthetic split: first stage alone vs EDJE re-ranking its top-k.

    Everything goes through the shipped path: :class:`ModelSource` (strict loading), its image
    processor and both tokenizers. Prints a few queries that re-ranking fixes.
    """
    src = source if isinstance(source, ModelSource) else ModelSource.from_dir(source)
    indexing, _ = src.build_indexing_model()
    ranking, _ = src.build_ranking_model()
    text_model, _ = src.build_text_model()
    tokenizer, text_tokenizer, processor = (
        src.tokenizer(),
        src.text_tokenizer(),
        src.image_processor(),
    )
    examples = list(synthetic.generate(split, seed, images_per_scene=1))
    keys = [ex.scene.key for ex in examples]
    captions = [ex.captions[0] for ex in examples]
    kinds = [ex.kind for ex in examples]
    t0 = time.time()
    with torch.no_grad():
        embs, toks = [], []
        for s in range(0, len(examples), 128):
            px = processor(images=[e.image for e in examples[s : s + 128]], return_tensors="pt")
            out = indexing.encode(px["pixel_values"])
            embs.append(out.image_embedding)
            toks.append(out.compressed_tokens.half())  # stored as fp16, like the index
        image_emb, tokens = torch.cat(embs), torch.cat(toks)
    text_emb = embed_texts(text_model, text_tokenizer, captions, text_tokenizer.model_max_length)
    groups = np.arange(len(examples))
    report = rerank_recall(
        text_emb,
        image_emb,
        captions,
        groups,
        groups,
        kinds,
        ranker_scorer(indexing, ranking, tokenizer, tokens),
        top_k,
        max_queries,
        show,
    )
    report["seconds"] = round(time.time() - t0, 1)
    for ex in report["examples_fixed"]:
        print(
            f"  fixed: {ex['query']!r}\n    first stage top-1: {keys[ex['first_stage_top1']]}\n"
            f"    re-ranked top-1:   {keys[ex['reranked_top1']]}"
        )
    return report


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_source(
    out: str | Path,
    recipe: Recipe,
    tokenizer,
    text_tokenizer,
    clip: SiglipModel,
    indexing: EDJEModelForIndexing,
    ranking: EDJEModelForRanking,
    text_projection: nn.Linear,
    lm_config: BertConfig,
    description: str,
) -> ModelSource:
    """Write a model source (configs, tokenizers, processor, fp16 research-layout weights)."""
    out = Path(out)
    (out / "siglip").mkdir(parents=True, exist_ok=True)
    (out / "language_model").mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "language_model")
    lm_config.save_pretrained(out / "language_model")
    clip.config.save_pretrained(out / "siglip")
    text_tokenizer.save_pretrained(out / "siglip")
    siglip_processor(recipe.image_size).save_pretrained(out / "siglip")
    save_checkpoint(
        out / "edje.safetensors",
        indexing,
        ranking,
        clip,
        dtype=torch.float16,
        extra={"text_projection": text_projection},
    )
    source = ModelSource(
        siglip_path="siglip",
        language_model_path="language_model",
        checkpoint="edje.safetensors",
        num_compressed_tokens=recipe.num_compressed_tokens,
        adapter_mlp_dim=recipe.adapter_mlp_dim,
        description=description,
    )
    source.save(out)
    return ModelSource.from_dir(out)


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


def build_edje(recipe: Recipe, clip: SiglipModel, lm_config: BertConfig):
    """Fresh adapter/joint encoder/head/text projection on top of ``clip``'s vision tower."""
    indexing = EDJEModelForIndexing(
        vision_config=clip.config.vision_config,
        language_config=lm_config,
        num_compressed_tokens=recipe.num_compressed_tokens,
        adapter_mlp_dim=recipe.adapter_mlp_dim,
    )
    indexing.vision_encoder.load_state_dict(clip.vision_model.state_dict())
    indexing.vision_encoder.requires_grad_(False)
    ranking = EDJEModelForRanking(
        language_config=lm_config, num_compressed_tokens=recipe.num_compressed_tokens
    )
    text_projection = nn.Linear(lm_config.hidden_size, clip.config.text_config.projection_size)
    return indexing, ranking, text_projection


def train_default(
    recipe: Recipe, out: str | Path | None, stage1_cache: str | Path | None = None
) -> tuple[dict, ModelSource | None]:
    """The embedded default, end to end: world -> first stage -> EDJE -> (save) -> test report."""
    set_seed(recipe.seed)
    t_start = time.time()
    tokenizer = world_tokenizer(64)
    text_tokenizer = world_tokenizer(recipe.text_len)
    train = world_data("train", recipe.seed, recipe.images_per_scene, all_templates=True)
    val = world_data("val", recipe.seed, 1, all_templates=False)
    log.info(
        f"world: {len(train.image_group)} train images, {len(train.captions)} captions, "
        f"{len(train.images_of)} train scenes; {len(val.image_group)} val scenes"
    )
    clip = new_first_stage(
        first_stage_config(recipe, text_tokenizer.vocab_size, text_tokenizer.pad_token_id)
    )
    log.info(f"first stage: {sum(p.numel() for p in clip.parameters()) / 1e6:.2f}M parameters")
    if stage1_cache and Path(stage1_cache).is_file():
        clip.load_state_dict(torch.load(stage1_cache, weights_only=True))
        stage1 = first_stage_recall(clip, text_tokenizer, val, recipe.text_len)
        log.info(f"stage 1 loaded from {stage1_cache}")
    else:
        stage1 = train_first_stage(clip, text_tokenizer, train, val, recipe)
        if stage1_cache:
            torch.save(clip.state_dict(), stage1_cache)
    t_stage1 = time.time() - t_start
    log.info(f"stage 1 done in {t_stage1:.0f}s: val {stage1}")
    clip.eval().requires_grad_(False)

    lm_config = language_config(recipe, tokenizer.vocab_size)
    indexing, ranking, text_projection = build_edje(recipe, clip, lm_config)
    trainable = sum(
        p.numel()
        for m in (indexing.vision_projection, ranking, text_projection)
        for p in m.parameters()
    )
    log.info(f"EDJE: {trainable / 1e6:.2f}M trainable parameters")
    features = Features(indexing.vision_encoder, train, cache=True, device="cpu")
    sample = features(range(min(512, len(train.image_group))))  # for the start-up fits
    if recipe.stage2.adapter_init == "spatial":
        init_adapter_spatial(indexing.vision_projection, sample)
    elif recipe.stage2.adapter_init == "head":
        init_adapter_from_head(indexing.vision_projection, clip, recipe.stage2.warm_start_adapter)
    if recipe.stage2.image_token_scale > 0:
        match_token_scale(
            indexing.vision_projection,
            ranking,
            sample,
            recipe.stage2.image_token_scale,
        )
    image_emb, _ = embed_images(clip, train)
    caption_emb = embed_texts(clip.text_model, text_tokenizer, train.captions, recipe.text_len)
    trainer = EDJETrainer(
        indexing,
        ranking,
        text_projection,
        tokenizer,
        train,
        features,
        caption_emb,
        image_emb,
        recipe.stage2,
        seed=recipe.seed,
        caption_editor=synthetic.edit_caption,
        mlm_groups=tuple(synthetic.WORD_GROUPS.values()),
        phrase_classes=synthetic.phrase_classes,
    )
    val_features = Features(indexing.vision_encoder, val, cache=True, device="cpu")
    val_img, _ = embed_images(clip, val)
    val_txt = embed_texts(clip.text_model, text_tokenizer, val.captions, recipe.text_len)

    curve: list[dict] = []

    def validate() -> dict:
        indexing.eval()
        ranking.eval()
        rep = rerank_recall(
            val_txt,
            val_img,
            val.captions,
            val.caption_group,
            val.image_group,
            val.caption_kind,
            ranker_scorer(indexing, ranking, tokenizer, val_features),
            max_queries=recipe.stage2.eval_queries or None,
        )
        keys = ("first_stage_R@1", "first_stage_R@10", "reranked_R@1", "hard_reranked_R@1")
        scores = {k: rep[k] for k in keys}
        minutes = round((time.time() - t_start) / 60, 1)
        curve.append({"step": trainer.step, "minutes": minutes} | scores)
        return scores

    trainer.fit(validate)
    t_train = time.time() - t_start
    log.info(f"training done in {t_train:.0f}s")
    ranking.eval()
    indexing.eval()
    source = None
    if out is not None:
        source = save_source(
            out,
            recipe,
            tokenizer,
            text_tokenizer,
            clip,
            indexing,
            ranking,
            text_projection,
            lm_config,
            description=(
                f"embedded default: EDJE trained on the synthetic world (seed {recipe.seed}) "
                "by `python -m edje.train default`"
            ),
        )
        log.info(f"wrote {out}")
        report = evaluate(source, "test", recipe.seed)
    else:
        report = {}
    report["train_seconds"] = round(t_train)
    report["stage1_seconds"] = round(t_stage1)
    report["stage1_val"] = stage1
    report["stage2_steps"] = trainer.step
    report["validation_curve"] = curve
    if out is not None:
        write_training_record(Path(out), recipe, report)
    return report, source


def write_training_record(out: Path, recipe: Recipe, report: dict) -> None:
    """``training.json`` (recipe, command, report) and a readable ``TRAINING.md`` beside the
    weights, so a shipped default always says exactly what made it."""
    command = "python -m edje.train " + " ".join(sys.argv[1:])
    record = {"command": command, "recipe": asdict(recipe), "report": report}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    kinds = "\n".join(
        f"| {k} | {v['n']} | {v['first_stage_R@1']} | {v['reranked_R@1']} |"
        for k, v in report.get("by_kind", {}).items()
    )
    curve = "\n".join(
        f"| {c['step']} | {c['minutes']} | {c['first_stage_R@1']} | {c['reranked_R@1']} |"
        for c in report["validation_curve"]
    )
    (out / "TRAINING.md").write_text(
        f"""# How this model was made

Made by `{command}` (seed {recipe.seed}) on {time.strftime("%Y-%m-%d")}, in
{report["train_seconds"] / 60:.0f} minutes on this machine ({torch.get_num_threads()} threads):
stage 1 {report["stage1_seconds"]}s, then {report["stage2_steps"]} stage-2 steps. The full
recipe and report are in `training.json`; docs/training.md explains the recipe.

## Held-out test split (`python -m edje.train evaluate --source DIR`)

Text->image R@1 over {report.get("queries")} queries against a gallery of {report.get("gallery")}
images: first stage {report.get("first_stage_R@1")}, after EDJE re-ranks the top 10
**{report.get("reranked_R@1")}** (gain {report.get("gain_R@1")}); hard subset
({report.get("hard_queries")} queries) {report.get("hard_first_stage_R@1")} ->
**{report.get("hard_reranked_R@1")}**. First-stage R@10: {report.get("first_stage_R@10")}.

| kind | queries | first stage R@1 | re-ranked R@1 |
| --- | --- | --- | --- |
{kinds}

## Validation during training

| step | minutes | first stage R@1 | re-ranked R@1 |
| --- | --- | --- | --- |
{curve}
"""
    )


def finetune(args: argparse.Namespace) -> dict:
    """Fine-tune a model source's EDJE (frozen ViT and first stage) on a Karpathy dataset."""
    src = ModelSource.from_dir(args.source)
    device = torch.device(args.device)
    indexing, _ = src.build_indexing_model()
    ranking, _ = src.build_ranking_model()
    text_model, _ = src.build_text_model()
    tokenizer, text_tokenizer = src.tokenizer(), src.text_tokenizer()
    data = karpathy_data(args.data, args.split, args.image_root, src.image_processor())
    indexing.to(device)
    ranking.to(device)
    text_model.to(device)
    features = Features(indexing.vision_encoder, data, cache=not args.no_cache, device=device)
    with torch.no_grad():
        embs = []
        for s in range(0, len(data.image_group), 64):
            px = data.pixel_values(range(s, min(s + 64, len(data.image_group)))).to(device)
            embs.append(
                F.normalize(indexing.vision_encoder(pixel_values=px).pooler_output, dim=-1).cpu()
            )
        image_emb = torch.cat(embs)
    caption_emb = embed_texts(
        text_model.cpu(), text_tokenizer, data.captions, min(text_tokenizer.model_max_length, 64)
    )
    state = src.state_dict
    text_projection = nn.Linear(ranking.language_model.config.hidden_size, caption_emb.shape[1])
    if "text_projection.weight" in state:
        text_projection.load_state_dict(
            {
                k.split(".", 1)[1]: v.float()
                for k, v in state.items()
                if k.startswith("text_projection.")
            }
        )
    text_projection.to(device)
    cfg = StageTwo(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup)
    trainer = EDJETrainer(
        indexing,
        ranking,
        text_projection,
        tokenizer,
        data,
        features,
        caption_emb,
        image_emb,
        cfg,
        seed=args.seed,
        device=device,
    )
    trainer.fit()
    out = Path(args.out)
    import shutil

    if out.resolve() != Path(args.source).resolve():
        shutil.copytree(args.source, out, dirs_exist_ok=True)
    from safetensors.torch import save_file

    tensors = dict(state)
    new = to_research_layout({**indexing.state_dict(), **ranking.state_dict()})
    new |= {f"text_projection.{k}": v for k, v in text_projection.state_dict().items()}
    dtype = next(iter(state.values())).dtype
    tensors |= {k: v.detach().cpu().to(dtype).contiguous().clone() for k, v in new.items()}
    save_file(tensors, str(out / Path(src.checkpoint).name))
    return {"steps": args.steps, "out": str(out)}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edje.train", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("default", help="train the embedded default on the synthetic world")
    d.add_argument("--out", default="build_scripts/edje/default_model")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--stage1-steps", type=int, default=Recipe.stage1_steps)
    d.add_argument(
        "--stage2-steps", type=int, default=100_000, help="steps (a cap with --stage2-minutes)"
    )
    d.add_argument(
        "--stage2-minutes",
        type=float,
        default=80,
        help="wall-time budget: the schedule runs on time (0: on steps, deterministic)",
    )
    d.add_argument("--images-per-scene", type=int, default=Recipe.images_per_scene)
    d.add_argument("--recipe", help="JSON object overriding Recipe/StageTwo fields")
    d.add_argument("--stage1-cache", help="load the first stage from / save it to this file")
    d.add_argument("--no-save", action="store_true", help="train and validate only")
    e = sub.add_parser("evaluate", help="R@1 on a synthetic split: first stage vs re-ranked")
    e.add_argument("--source", default="build_scripts/edje/default_model")
    e.add_argument("--split", default="test")
    e.add_argument("--seed", type=int, default=0)
    w = sub.add_parser("world", help="write a synthetic split as PNGs + Karpathy JSON")
    w.add_argument("--out", required=True)
    w.add_argument("--split", default="test")
    w.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("finetune", help="fine-tune a model source on a Karpathy-format dataset")
    f.add_argument("--source", required=True)
    f.add_argument("--data", required=True, help="Karpathy-format dataset JSON")
    f.add_argument("--image-root", default=None)
    f.add_argument("--split", default="train")
    f.add_argument("--out", required=True)
    f.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    f.add_argument("--steps", type=int, default=1000)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--lr", type=float, default=2e-5)
    f.add_argument("--warmup", type=int, default=100)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-cache", action="store_true", help="run the ViT per batch")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # `tail -f` the log of a background run
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True
    )
    if args.command == "default":
        recipe = Recipe(
            seed=args.seed,
            stage1_steps=args.stage1_steps,
            images_per_scene=args.images_per_scene,
            stage2=StageTwo(steps=args.stage2_steps, time_budget=60 * args.stage2_minutes),
        )
        if args.recipe:
            overrides = json.loads(args.recipe)
            stage2 = overrides.pop("stage2", {})
            recipe = Recipe(**(asdict(recipe) | overrides | {"stage2": recipe.stage2}))
            recipe.stage2 = StageTwo(**(asdict(recipe.stage2) | stage2))
        log.info(f"recipe: {json.dumps(asdict(recipe))}")
        report, _ = train_default(recipe, None if args.no_save else args.out, args.stage1_cache)
    elif args.command == "evaluate":
        report = evaluate(args.source, args.split, args.seed)
    elif args.command == "world":
        report = {"written": str(synthetic.write_karpathy(args.out, args.split, args.seed))}
    else:
        report = finetune(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
