"""Quantisation-aware fine-tuning: a model source whose int8 ranker ranks as its fp32 one.

ONNX Runtime's dynamic int8 (``--quantize-ranker int8``) adds about 0.1 of a logit of error to
each score, and the default's re-rank lists are tight (docs/optimisations.md rows 29 and 31),
so int8 reorders some of them. This fine-tunes the joint encoder (its word embeddings stay
frozen: the held-out phrasings rely on them) on re-rank lists of the synthetic train split
with two losses:

* *anchor*: its fp32 scores stay those of the frozen original (mean squared error on logits),
  so what it ranks, and how well, is kept;
* *consistency*: its int8 scores, simulated as ORT computes them (:mod:`edje.training.
  fake_int8`: per-channel weights, one activation scale per batch, rounding passed straight
  through), match its own fp32 scores, so the weights move to where int8 rounding costs least.

``python -m edje.train int8-robust --source DIR --out DIR`` runs it (minutes on CPU).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edje.checkpoint import write_updated_source
from edje.model_source import ModelSource
from edje.training.fake_int8 import fake_int8
from edje.training.rerank_lists import rerank_lists

log = logging.getLogger("edje.training")


@dataclass(frozen=True)
class Int8Robust:
    """The fine-tune's settings."""

    steps: int = 400
    lists_per_step: int = 8  # re-rank lists of 10 pairs in one batch, as serving batches them
    lr: float = 1e-5
    warmup: int = 20
    consistency_weight: float = 1.0
    validate_every: int = 100
    validation_lists: int = 100
    train_scenes: int = 0  # scenes of the train split to draw lists from (0: all 3,065)
    seed: int = 0


def batch_of(lists: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Re-rank lists as one batch of ranker inputs: layouts padded at the end to the longest."""
    width = max(f["input_ids"].shape[1] for f in lists)

    def padded(key: str, fill: int) -> torch.Tensor:
        rows = [
            np.pad(f[key], ((0, 0), (0, width - f[key].shape[1])), constant_values=fill)
            for f in lists
        ]
        return torch.from_numpy(np.concatenate(rows))

    tokens = np.concatenate([f["compressed_tokens"] for f in lists])
    return {
        "input_ids": padded("input_ids", pad_id),
        "attention_mask": padded("attention_mask", 0),
        "token_type_ids": padded("token_type_ids", 0),
        "compressed_tokens": torch.from_numpy(tokens).float(),
    }


def list_agreement(reference: torch.Tensor, candidate: torch.Tensor, k: int) -> float:
    """Share of the lists of ``k`` consecutive scores whose top-1 is the same in both."""
    return float(
        (reference.view(-1, k).argmax(1) == candidate.view(-1, k).argmax(1)).float().mean()
    )


def _scores(model, batch: dict[str, torch.Tensor], int8: bool) -> torch.Tensor:
    if not int8:
        return model.score_pairs(**batch)
    with fake_int8(model, "per_tensor"):
        return model.score_pairs(**batch)


def int8_robust(source: str | Path, out: str | Path | None, cfg: Int8Robust = Int8Robust()) -> dict:
    """Fine-tune ``source``'s joint encoder so that its simulated int8 scores match its fp32
    ones, its fp32 scores anchored to the original's; write the result to ``out`` (a copy of
    the source with the new weights; ``None``: do not save). Returns the validation history."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    src = ModelSource.from_dir(source)
    student, _ = src.build_ranking_model()
    student.eval()  # no dropout: the scores are compared exactly
    teacher = copy.deepcopy(student).requires_grad_(False)
    pad_id = src.tokenizer().pad_token_id or 0
    train = rerank_lists(src, "train", max_scenes=cfg.train_scenes or None)
    k = len(train[0]["input_ids"])
    # Validation as ``make bench`` measures int8: each list one batch (one activation scale).
    val = [batch_of([f], pad_id) for f in rerank_lists(src, "val")[: cfg.validation_lists]]
    with torch.no_grad():
        val_original = torch.cat([teacher.score_pairs(**b) for b in val])
    params = [p for n, p in student.named_parameters() if "word_embeddings" not in n]
    for n, p in student.named_parameters():
        p.requires_grad_("word_embeddings" not in n)
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / cfg.warmup)
    )

    def validate(step: int) -> dict:
        with torch.no_grad():
            fp32 = torch.cat([_scores(student, b, False) for b in val])
            int8 = torch.cat([_scores(student, b, True) for b in val])
        row = {
            "step": step,
            "int8_top1_agreement": list_agreement(fp32, int8, k),
            "int8_logit_rms": float((int8 - fp32).pow(2).mean().sqrt()),
            "top1_agreement_with_original": list_agreement(val_original, fp32, k),
            "logit_rms_to_original": float((fp32 - val_original).pow(2).mean().sqrt()),
        }
        log.info(
            "int8-robust step %d: int8 top-1 %.1f%% (logit RMS %.3f); fp32 vs original "
            "top-1 %.1f%% (RMS %.3f)",
            step,
            100 * row["int8_top1_agreement"],
            row["int8_logit_rms"],
            100 * row["top1_agreement_with_original"],
            row["logit_rms_to_original"],
        )
        return row

    history = [validate(0)]
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        chosen = rng.choice(len(train), cfg.lists_per_step, replace=False)
        batch = batch_of([train[i] for i in chosen], pad_id)
        with torch.no_grad():
            target = teacher.score_pairs(**batch)
        fp32 = _scores(student, batch, False)
        int8 = _scores(student, batch, True)
        anchor = F.mse_loss(fp32, target)
        consistency = F.mse_loss(int8, fp32.detach())
        loss = anchor + cfg.consistency_weight * consistency
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % cfg.validate_every == 0 or step == cfg.steps:
            history.append(validate(step))
    report = {"settings": asdict(cfg), "minutes": (time.perf_counter() - start) / 60}
    report["history"] = history
    if out is not None:
        new = {k: v for k, v in student.state_dict().items()}
        report["out"] = str(write_updated_source(source, out, src.checkpoint, new).parent)
    return report
