"""Stage one: the first-stage dual encoder, a small transformers ``SiglipModel``.

Trained with the sigmoid loss (logit scale log(10), bias -10; captions that truly describe
another image in the batch count as positives), plus two per-patch auxiliary losses on the
ViT's last hidden state: the patch's grid position and its mix of objects from the renderer's
label map. Its vision tower becomes EDJE's frozen ViT and its text tower the first-stage text
search.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipConfig, SiglipModel

from edje import synthetic
from edje.training.data import PairData, patch_object_mix
from edje.training.recipe import Recipe
from edje.training.schedule import lr_multiplier
from edje_client.evaluation import first_relevant_rank, first_stage_order, recalls

log = logging.getLogger(__name__)
WARMUP = 100  # learning-rate warm-up steps


def first_stage_config(
    recipe: Recipe, vocab_size: int, pad_id: int, bos_id: int = 2, eos_id: int = 3
) -> SiglipConfig:
    """The first stage's SigLIP config at the recipe's sizes."""
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


def first_stage_recall(clip, tokenizer, val: PairData, text_len: int) -> dict[str, float]:
    """Text->image R@1 and R@10 (percent) of the first stage alone on ``val``."""
    img, _ = embed_images(clip, val)
    txt = embed_texts(clip.text_model, tokenizer, val.captions, text_len)
    order = first_stage_order((txt @ img.T).numpy())
    return recalls(first_relevant_rank(order, val.relevant()), ks=(1, 10))


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
    n, b, steps = len(data.image_group), recipe.stage1_batch, recipe.stage1_steps
    t0, seen = time.time(), 0
    for step in range(steps):
        clip.train()
        done = (step - WARMUP) / max(1, steps - WARMUP)
        for g in opt.param_groups:
            g["lr"] = recipe.stage1_lr * lr_multiplier(step, done, WARMUP)
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
        if step % 50 == 0 or step == steps - 1:
            msg = (
                f"stage1 step {step}/{steps} loss {loss.item():.3f} "
                f"position {position.item():.3f} objects {objects.item():.3f} "
                f"scale {clip.logit_scale.exp().item():.1f} bias {clip.logit_bias.item():.1f} "
                f"{seen / (time.time() - t0):.0f} pairs/s"
            )
            if step % 250 == 0 or step == steps - 1:
                rec = first_stage_recall(clip, tokenizer, val, recipe.text_len)
                msg += f" | val R@1 {rec['R@1']:.1f} R@10 {rec['R@10']:.1f}"
            log.info(msg)
    return first_stage_recall(clip, tokenizer, val, recipe.text_len)
