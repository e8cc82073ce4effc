"""Training's evaluation: score matrices computed with torch, reports by the shared code.

The first-stage similarities and EDJE's pair logits are computed here, with the models in
memory; Recall@K, the hard subset, the per-kind rows and the report's keys come from
:func:`edje_client.evaluation.rerank_report`, the same code as ``edje eval`` through a server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from edje import synthetic
from edje.model_source import ModelSource
from edje.training.data import Features, PairData, encode_captions
from edje.training.first_stage import embed_texts
from edje.world_captions import clause_order
from edje_client.evaluation import rerank_report

PairScores = Callable[[np.ndarray, np.ndarray], np.ndarray]


def pair_scorer(
    indexing,
    ranking,
    tokenizer,
    captions: Sequence[str],
    tokens_or_features: torch.Tensor | Features,
    device: str | torch.device = "cpu",
    batch: int = 160,
) -> PairScores:
    """``pair_scores(caption_indices, image_indices) -> logits`` for :func:`split_report`,
    ``batch`` pairs at a time (16 queries of 10 candidates), from stored image tokens or
    from ViT features through the adapter."""

    def tokens_for(images: np.ndarray) -> torch.Tensor:
        if isinstance(tokens_or_features, torch.Tensor):
            return tokens_or_features[torch.as_tensor(images)].to(device).float()
        return indexing.vision_projection(tokens_or_features(images.tolist()))

    @torch.no_grad()
    def pair_scores(caption_idx: np.ndarray, image_idx: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(caption_idx), batch):
            enc = encode_captions(
                tokenizer, [captions[c] for c in caption_idx[start : start + batch]]
            )
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            tokens = tokens_for(image_idx[start : start + batch])
            out.append(ranking(tokens, ids, mask).float().cpu())
        return torch.cat(out).numpy()

    return pair_scores


@torch.no_grad()
def split_report(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    data: PairData,
    pair_scores: PairScores,
    top_k: int = 10,
    max_queries: int | None = None,
    image_names: Sequence[str] | None = None,
    show: int = 0,
    image_to_text: bool = False,
) -> dict:
    """First stage vs EDJE re-ranking its top ``top_k`` on ``data`` (the first
    ``max_queries`` captions): text->image, and image->text if asked."""
    n = len(data.captions) if max_queries is None else min(max_queries, len(data.captions))
    sims = (text_emb[:n] @ image_emb.T).numpy()
    return rerank_report(
        sims,
        data.relevant(n),
        pair_scores,
        top_k,
        image_to_text=image_to_text,
        caption_kind=data.caption_kind[:n],
        captions=data.captions[:n],
        image_names=image_names,
        examples=show,
    )


def headline(report: dict) -> dict[str, float]:
    """A report's text->image headline numbers, rounded (validation curve, logs)."""
    t2i, hard = report["text_to_image"], report.get("text_to_image_r1_hard", {})
    numbers = {
        "first_stage_R@1": t2i["first_stage"]["R@1"],
        "first_stage_R@10": t2i["first_stage"]["R@10"],
        "reranked_R@1": t2i["reranked"]["R@1"],
        "hard_reranked_R@1": hard.get("reranked", float("nan")),
    }
    return {k: round(v, 1) for k, v in numbers.items()}


def evaluate(
    source: str | Path | ModelSource = "build_scripts/edje/default_model",
    split: str = "test",
    seed: int = 0,
    top_k: int = 10,
    max_queries: int | None = None,
    show: int = 5,
    tier: str = "seen",
    by: str = "kind",
) -> dict:
    """Recall@K on a synthetic split in one evaluation ``tier`` (:data:`edje.synthetic.TIERS`),
    first stage alone vs EDJE re-ranking its top-k: the report of ``edje eval``, image->text
    only when every caption is a query. ``by="construction"`` reports two-object captions by
    their clause order (:func:`edje.world_captions.clause_order`) instead of their kind.

    Everything goes through the shipped path: :class:`ModelSource` (strict loading), its image
    processor and both tokenizers. Prints a few queries that re-ranking fixes.
    """
    src = source if isinstance(source, ModelSource) else ModelSource.from_dir(source)
    indexing, _ = src.build_indexing_model()
    ranking, _ = src.build_ranking_model()
    text_model, _ = src.build_text_model()
    tokenizer, text_tokenizer = src.tokenizer(), src.text_tokenizer()
    processor = src.image_processor()
    if by not in ("kind", "construction"):
        raise ValueError(f"by must be 'kind' or 'construction', not {by!r}")
    examples = list(synthetic.generate_tier(split, tier, seed, images_per_scene=1))
    rows = np.arange(len(examples))  # one image per scene: every image is its own group
    captions = [ex.captions[0] for ex in examples]
    groups = [
        clause_order(text) if by == "construction" and ex.scene.kind == "pair" else ex.kind
        for ex, text in zip(examples, captions, strict=True)
    ]
    data = PairData(rows, captions, rows, groups)
    t0 = time.time()
    with torch.no_grad():
        embs, toks = [], []
        for s in range(0, len(examples), 128):
            px = processor(images=[e.image for e in examples[s : s + 128]], return_tensors="pt")
            out = indexing.encode(px["pixel_values"])
            embs.append(out.image_embedding)
            toks.append(out.compressed_tokens.half())  # stored as fp16, like the index
        image_emb, tokens = torch.cat(embs), torch.cat(toks)
    text_emb = embed_texts(
        text_model, text_tokenizer, data.captions, text_tokenizer.model_max_length
    )
    scores = pair_scorer(indexing, ranking, tokenizer, data.captions, tokens, batch=16 * top_k)
    names = [ex.scene.key for ex in examples]
    report = split_report(
        text_emb, image_emb, data, scores, top_k, max_queries, names, show, max_queries is None
    )
    report["seconds"] = round(time.time() - t0, 1)
    for ex in report["fixed_examples"]:
        print(
            f"  fixed: {ex['query']!r}\n    first stage top-1: {ex['first_stage_top1']}\n"
            f"    re-ranked top-1:   {ex['reranked_top1']}"
        )
    return report


def evaluate_tiers(
    source: str | Path | ModelSource = "build_scripts/edje/default_model",
    split: str = "test",
    seed: int = 0,
    show: int = 0,
    by: str = "kind",
) -> dict:
    """:func:`evaluate` on every tier: ``{"tiers": {tier: report}, "summary": rows}``, where
    each summary row is a tier's (or a tier's caption kind's, or construction's: ``by``)
    queries and R@1 before and after re-ranking."""
    src = source if isinstance(source, ModelSource) else ModelSource.from_dir(source)
    tiers = {t: evaluate(src, split, seed, show=show, tier=t, by=by) for t in synthetic.TIERS}
    rows = []
    for tier, report in tiers.items():
        t2i = report["text_to_image"]
        rows.append(
            {
                "tier": tier,
                "kind": "all",
                "queries": report["num_captions"],
                "first_stage_R@1": round(t2i["first_stage"]["R@1"], 1),
                "reranked_R@1": round(t2i["reranked"]["R@1"], 1),
            }
        )
        for kind, row in report.get("text_to_image_r1_by_kind", {}).items():
            rows.append(
                {
                    "tier": tier,
                    "kind": kind,
                    "queries": row["queries"],
                    "first_stage_R@1": round(row["first_stage"], 1),
                    "reranked_R@1": round(row["reranked"], 1),
                }
            )
    return {"tiers": tiers, "summary": rows}
