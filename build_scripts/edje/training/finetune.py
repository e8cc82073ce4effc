"""Fine-tuning a model source's EDJE (frozen ViT and first stage) on a Karpathy dataset."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edje.checkpoint import write_updated_source
from edje.configuration import QUERY_TOKENS
from edje.model_source import ModelSource
from edje.training.data import Features, karpathy_data
from edje.training.first_stage import embed_texts
from edje.training.recipe import StageTwo
from edje.training.trainer import EDJETrainer

EMBED_BATCH = 64  # images per ViT pass when embedding the gallery


def finetune(
    source: str | Path,
    data: str | Path,
    out: str | Path,
    image_root: str | Path | None = None,
    split: str = "train",
    device: str = "cpu",
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 2e-5,
    warmup: int = 100,
    seed: int = 0,
    cache: bool = True,
) -> dict:
    """Train ``source``'s adapter, joint encoder, head and text projection on the ``split``
    of the Karpathy JSON ``data`` (random and first-stage-mined negatives), then write the
    source with the new weights (in its checkpoint's dtype) to ``out``.

    ``cache`` keeps the frozen ViT's features of every image in memory instead of running the
    ViT per batch.
    """
    src = ModelSource.from_dir(source)
    device = torch.device(device)
    indexing, _ = src.build_indexing_model()
    ranking, _ = src.build_ranking_model()
    text_model, _ = src.build_text_model()
    tokenizer, text_tokenizer = src.tokenizer(), src.text_tokenizer()
    pairs = karpathy_data(data, split, image_root, src.image_processor())
    indexing.to(device)
    ranking.to(device)
    text_model.to(device)
    features = Features(indexing.vision_encoder, pairs, cache=cache, device=device)
    with torch.no_grad():
        embs = []
        n = len(pairs.image_group)
        for s in range(0, n, EMBED_BATCH):
            px = pairs.pixel_values(range(s, min(s + EMBED_BATCH, n))).to(device)
            pooled = indexing.vision_encoder(pixel_values=px).pooler_output
            embs.append(F.normalize(pooled, dim=-1).cpu())
        image_emb = torch.cat(embs)
    text_len = min(text_tokenizer.model_max_length, QUERY_TOKENS)
    caption_emb = embed_texts(text_model.cpu(), text_tokenizer, pairs.captions, text_len)
    state = src.state_dict
    text_projection = nn.Linear(ranking.language_model.config.hidden_size, caption_emb.shape[1])
    prefix = "text_projection."
    if prefix + "weight" in state:
        text_projection.load_state_dict(
            {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
        )
    text_projection.to(device)
    cfg = StageTwo(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup)
    trainer = EDJETrainer(
        indexing,
        ranking,
        text_projection,
        tokenizer,
        pairs,
        features,
        caption_emb,
        image_emb,
        cfg,
        seed=seed,
        device=device,
    )
    trainer.fit()
    new = {**indexing.state_dict(), **ranking.state_dict()}
    new |= {prefix + k: v for k, v in text_projection.state_dict().items()}
    write_updated_source(source, out, src.checkpoint, new)
    return {"steps": steps, "out": str(out)}
