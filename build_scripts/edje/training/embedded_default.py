"""The embedded default, end to end: world -> first stage -> EDJE -> model source -> report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertTokenizerFast, SiglipModel

from edje import synthetic
from edje.configuration import MAX_TEXT_TOKENS
from edje.model_source import ModelSource
from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking
from edje.tiny import save_checkpoint, siglip_processor
from edje.training.adapter_init import start_adapter
from edje.training.data import Features, world_data, world_tokenizer
from edje.training.evaluation import evaluate_tiers, headline, pair_scorer, split_report
from edje.training.first_stage import (
    embed_images,
    embed_texts,
    first_stage_config,
    first_stage_recall,
    new_first_stage,
    train_first_stage,
)
from edje.training.language_prior import (
    load_language_prior,
    minilm_config,
    minilm_dir,
    minilm_tokenizer,
)
from edje.training.recipe import Recipe, set_seed
from edje.training.record import write_training_record
from edje.training.trainer import EDJETrainer

log = logging.getLogger(__name__)


def language_config(recipe: Recipe, vocab_size: int) -> BertConfig:
    """The joint encoder's config: the packaged MiniLM's cut to ``lm_layers`` (prior
    ``minilm``), or a MiniLM-like one of the recipe's sizes over ``vocab_size`` words."""
    positions = MAX_TEXT_TOKENS + recipe.num_compressed_tokens
    if recipe.language_prior == "minilm":
        if recipe.vocabulary != "minilm":
            raise ValueError("the MiniLM prior needs its own vocabulary (vocabulary='minilm')")
        return minilm_config(minilm_dir(), recipe.lm_layers, recipe.lm_dropout, positions)
    if recipe.language_prior != "none":
        raise ValueError(
            f"language_prior must be 'minilm' or 'none', not {recipe.language_prior!r}"
        )
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.lm_width,
        num_hidden_layers=recipe.lm_layers,
        num_attention_heads=recipe.lm_heads,
        intermediate_size=recipe.lm_intermediate,
        max_position_embeddings=positions,
        hidden_act="gelu",
        hidden_dropout_prob=recipe.lm_dropout,
        attention_probs_dropout_prob=recipe.lm_dropout,
    )


def tokenizers(recipe: Recipe) -> tuple[BertTokenizerFast, BertTokenizerFast]:
    """The joint encoder's and the first stage's tokenizers, over ``recipe.vocabulary``."""
    if recipe.vocabulary == "minilm":
        path = minilm_dir()
        return minilm_tokenizer(path, MAX_TEXT_TOKENS), minilm_tokenizer(path, recipe.text_len)
    if recipe.vocabulary != "world":
        raise ValueError(f"vocabulary must be 'minilm' or 'world', not {recipe.vocabulary!r}")
    return world_tokenizer(MAX_TEXT_TOKENS), world_tokenizer(recipe.text_len)


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


def stage_one(recipe: Recipe, text_tokenizer, train, val, cache: str | Path | None):
    """The first stage, trained (and saved to ``cache``) or loaded from ``cache``; returns it
    frozen, with its validation recall."""
    clip = new_first_stage(
        first_stage_config(
            recipe,
            len(text_tokenizer),
            text_tokenizer.pad_token_id,
            text_tokenizer.cls_token_id,
            text_tokenizer.sep_token_id,
        )
    )
    log.info(f"first stage: {sum(p.numel() for p in clip.parameters()) / 1e6:.2f}M parameters")
    if cache and Path(cache).is_file():
        clip.load_state_dict(torch.load(cache, weights_only=True))
        recall = first_stage_recall(clip, text_tokenizer, val, recipe.text_len)
        log.info(f"stage 1 loaded from {cache}")
    else:
        recall = train_first_stage(clip, text_tokenizer, train, val, recipe)
        if cache:
            torch.save(clip.state_dict(), cache)
    return clip.eval().requires_grad_(False), recall


def train_default(
    recipe: Recipe, out: str | Path | None, stage1_cache: str | Path | None = None
) -> tuple[dict, ModelSource | None]:
    """The embedded default, end to end: world -> first stage -> EDJE -> (save) -> test report."""
    set_seed(recipe.seed)
    t_start = time.time()
    tokenizer, text_tokenizer = tokenizers(recipe)
    train = world_data("train", recipe.seed, recipe.images_per_scene, all_templates=True)
    val = world_data("val", recipe.seed, 1, all_templates=False)
    log.info(
        f"world: {len(train.image_group)} train images, {len(train.captions)} captions, "
        f"{len(train.images_of)} train scenes; {len(val.image_group)} val scenes"
    )
    clip, stage1 = stage_one(recipe, text_tokenizer, train, val, stage1_cache)
    t_stage1 = time.time() - t_start
    log.info(f"stage 1 done in {t_stage1:.0f}s: val {stage1}")
    set_seed(recipe.seed + 1)  # stage two's random stream: the same whether stage one was
    # trained or loaded from ``stage1_cache``

    lm_config = language_config(recipe, tokenizer.vocab_size)  # <image> comes on top
    indexing, ranking, text_projection = build_edje(recipe, clip, lm_config)
    if recipe.language_prior == "minilm":
        copied = load_language_prior(ranking, minilm_dir())
        if recipe.stage2.freeze_word_embeddings:
            # The pretrained word table (and the MLM decoder tied to it) stays as published:
            # words the world never uses keep their place beside the ones it does.
            ranking.language_model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        log.info(
            f"joint encoder: {copied} tensors from all-MiniLM-L6-v2 ({recipe.lm_layers} layers)"
        )
    trained = (indexing.vision_projection, ranking, text_projection)
    count = sum(p.numel() for m in trained for p in m.parameters())
    learnt = sum(p.numel() for m in trained for p in m.parameters() if p.requires_grad)
    log.info(f"EDJE: {count / 1e6:.2f}M parameters, {learnt / 1e6:.2f}M of them trained")
    features = Features(indexing.vision_encoder, train, cache=True, device="cpu")
    sample = features(range(min(512, len(train.image_group))))  # for the start-up fits
    start_adapter(recipe.stage2, indexing.vision_projection, ranking, clip, sample)
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
        pretrained=recipe.language_prior != "none",
    )
    # Validation on every evaluation tier: seen phrasings and style, held-out phrasings,
    # held-out rendering (only the val split's scenes; the test split stays unseen).
    tiers = {}
    for tier in synthetic.TIERS:
        data = val if tier == "seen" else world_data("val", recipe.seed, 1, False, tier)
        val_features = Features(indexing.vision_encoder, data, cache=True, device="cpu")
        val_img, _ = embed_images(clip, data)
        val_txt = embed_texts(clip.text_model, text_tokenizer, data.captions, recipe.text_len)
        scores = pair_scorer(indexing, ranking, tokenizer, data.captions, val_features)
        tiers[tier] = (val_txt, val_img, data, scores)
    curve: list[dict] = []

    def validate() -> dict:
        indexing.eval()
        ranking.eval()
        queries = recipe.stage2.eval_queries or None
        scores = {}
        for tier, (txt, img, data, pair_scores) in tiers.items():
            numbers = headline(split_report(txt, img, data, pair_scores, max_queries=queries))
            if tier == "seen":
                scores |= numbers
            else:
                scores[f"{tier}_first_stage_R@1"] = numbers["first_stage_R@1"]
                scores[f"{tier}_reranked_R@1"] = numbers["reranked_R@1"]
        minutes = round((time.time() - t_start) / 60, 1)
        curve.append({"step": trainer.step, "minutes": minutes} | scores)
        return scores

    trainer.fit(validate)
    t_train = time.time() - t_start
    log.info(f"training done in {t_train:.0f}s")
    ranking.eval()
    indexing.eval()
    source, report = None, {}
    if out is not None:
        description = (
            f"embedded default: EDJE trained on the synthetic world (seed {recipe.seed}) "
            "by `python -m edje.train default`"
        )
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
            description,
        )
        log.info(f"wrote {out}")
        tiers = evaluate_tiers(source, "test", recipe.seed)
        # The seen tier's report, with every tier's rows (by kind) beside it.
        report = tiers["tiers"]["seen"] | {"by_tier": tiers["summary"]}
    report["train_seconds"] = round(t_train)
    report["stage1_seconds"] = round(t_stage1)
    report["stage1_val"] = stage1
    report["stage2_steps"] = trainer.step
    report["validation_curve"] = curve
    if out is not None:
        write_training_record(Path(out), recipe, report)
    return report, source
