"""The stage-two trainer: adapter + joint encoder + head + ``text_projection`` on the frozen
ViT's patch features (sampling in :mod:`.negatives`, losses in :mod:`.losses`, schedules in
:mod:`.schedule`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking
from edje.training import losses as L
from edje.training import schedule
from edje.training.data import Features, PairData
from edje.training.grounding import MAX_COUNT, count_targets, grounding_targets, token_classes
from edje.training.negatives import CaptionEditor, NegativeSampler
from edje.training.recipe import StageTwo

log = logging.getLogger(__name__)


class EDJETrainer:
    """Stage-2 training of adapter + joint encoder + head + text projection.

    ``caption_emb`` and ``image_emb`` are the first stage's embeddings of ``data`` (mining,
    ITC and distillation targets). The synthetic world's signals are optional:
    ``caption_editor`` (edited-caption negatives and the contradiction loss), ``mlm_groups``
    (whole-group masking) and ``phrase_classes`` (grounding). With ``pretrained`` the joint
    encoder's embeddings and layers learn at ``cfg.prior_lr_scale`` times ``cfg.lr``.
    """

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
        caption_editor: CaptionEditor | None = None,
        mlm_groups: Sequence[Sequence[str]] | None = None,
        phrase_classes: Callable[[str], list[int]] | None = None,
        pretrained: bool = False,
    ) -> None:
        self.indexing, self.ranking, self.text_projection = indexing, ranking, text_projection
        self.tokenizer, self.data, self.features, self.cfg = tokenizer, data, features, cfg
        self.device = torch.device(device)
        self.caption_emb, self.image_emb = caption_emb, image_emb
        rng = np.random.default_rng(seed)  # one stream: sampling, then masking, every step
        editor = caption_editor if cfg.edit_negatives else None
        self.negatives = NegativeSampler(data, cfg, caption_emb, image_emb, rng, seed, editor)
        self.masker = L.WordGroupMasker(tokenizer, rng, cfg.mlm_probability, seed, mlm_groups)
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
        self.rtd_head = None
        if editor is not None:
            # Training-only head: which words of a pair does the image contradict?
            hidden = ranking.language_model.config.hidden_size
            self.rtd_head = nn.Linear(hidden, 1).to(self.device)
            self.params += list(self.rtd_head.parameters())
        self.where_head = None
        if self.phrase_classes is not None and cfg.where_weight > 0:
            # Training-only head: where in the image is the object this word names?
            hidden = ranking.language_model.config.hidden_size
            self.where_head = nn.Linear(hidden, 2).to(self.device)
            self.params += list(self.where_head.parameters())
        self.count_head = None
        if self.phrase_classes is not None and cfg.count_weight > 0:
            if data.class_counts is None:
                raise ValueError("the count loss needs the images' class counts")
            # Training-only head: how many objects of its class does this word's image hold?
            hidden = ranking.language_model.config.hidden_size
            self.count_head = nn.Linear(hidden, MAX_COUNT + 1).to(self.device)
            self.params += list(self.count_head.parameters())
        self.params = [p for p in self.params if p.requires_grad]  # frozen tables stay out
        prior = {id(p) for p in ranking.language_model.bert.parameters()} if pretrained else set()
        groups = [
            {"params": [p for p in self.params if id(p) not in prior], "lr_scale": 1.0},
            {"params": [p for p in self.params if id(p) in prior], "lr_scale": cfg.prior_lr_scale},
        ]
        # One fused kernel for every tensor (the per-tensor loop took ~10% of a step).
        self.opt = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
        )
        self.step = 0
        self.started = time.time()

    def progress(self) -> float:
        """Fraction of training done: by steps, or by wall time when ``time_budget`` is set."""
        return schedule.progress(self.cfg, self.step, time.time() - self.started)

    def sample(self) -> dict[str, np.ndarray]:
        """This step's batch (:meth:`NegativeSampler.sample`)."""
        return self.negatives.sample(self.progress())

    def losses(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Every loss of ``batch`` (and ``acc``), by name."""
        cfg, edited = self.cfg, self.rtd_head is not None
        pairs = L.forward_pairs(
            self.ranking,
            lambda idx: self.indexing.vision_projection(self.features(idx)),
            self.tokenizer,
            self.data.captions,
            batch,
            edited,
            self.phrase_classes is not None,
            self.device,
        )
        out = {"itm": L.itm_loss(pairs), "rank": L.rank_loss(pairs)}
        if edited:
            out["rtd"] = L.contradiction_loss(pairs, self.rtd_head)
        if self.phrase_classes is not None:
            q = self.indexing.vision_projection.query.shape[1]
            relations = schedule.grounds_relations(cfg, self.progress())
            classes = token_classes(
                self.data, batch, pairs.enc, pairs.mask.shape[1], self.phrase_classes
            )

            def targets(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
                """Grounding targets of the positives' words in ``images`` [B]."""
                return grounding_targets(
                    self.data, {**batch, "img": images}, pairs.enc, classes, q, relations
                )

            target, valid = targets(batch["img"])
            out["ground"] = L.grounding_loss(
                pairs, target, valid, cfg.ground_heads, cfg.ground_layers
            )
            if self.where_head is not None:
                rows, parts = [0], [(target, valid)]
                if cfg.where_on_negatives:  # where the caption's objects are in a wrong image
                    for j in range(cfg.image_negatives):
                        rows.append(1 + j)
                        parts.append(targets(batch["neg_img"][:, j]))
                where_target = torch.cat([t for t, _ in parts])
                where_valid = torch.cat([v for _, v in parts])
                out["where"] = L.where_loss(pairs, self.where_head, where_target, where_valid, rows)
            if self.count_head is not None:  # on the positives and every wrong image
                images = [batch["img"], *batch["neg_img"].T]
                parts = [count_targets(self.data, batch, classes, im) for im in images]
                out["count"] = L.count_loss(
                    pairs,
                    self.count_head,
                    torch.cat([t for t, _ in parts]),
                    torch.cat([v for _, v in parts]),
                    range(len(images)),
                )
        out["acc"] = L.accuracy(pairs)
        target = self.caption_emb[torch.as_tensor(batch["cap"])].to(self.device)
        out["itc"] = L.itc_loss(self.ranking, self.text_projection, pairs, target)
        masked, labels = self.masker(pairs.ids.cpu(), pairs.mask.cpu())
        out["mlm"] = L.mlm_loss(
            self.ranking,
            pairs,
            masked.to(self.device),
            labels.to(self.device),
            cfg.mlm_with_image,
        )
        if cfg.distill_weight > 0:
            candidates = [batch["img"][:, None], batch["neg_img"]]
            if not edited:
                candidates.append(batch["rand_img"][:, None])
            cand = torch.as_tensor(np.concatenate(candidates, axis=1))
            teacher = (target[:, None, :] * self.image_emb[cand].to(self.device)).sum(-1)
            out["distill"] = L.distill_loss(pairs, teacher, cfg.distill_temperature)
        return out

    def weights(self) -> dict[str, float]:
        """Each loss's weight now (distillation fades with progress)."""
        cfg = self.cfg
        return {
            "itm": cfg.itm_weight,
            "rank": cfg.rank_weight,
            "itc": cfg.itc_weight,
            "mlm": cfg.mlm_weight,
            "distill": schedule.distill_weight(cfg, self.progress()),
            "rtd": cfg.rtd_weight,
            "ground": cfg.ground_weight,
            "where": cfg.where_weight,
            "count": cfg.count_weight,
        }

    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns every loss, ``acc`` and the weighted ``loss``."""
        cfg = self.cfg
        multiplier = schedule.lr_multiplier(self.step, self.progress(), cfg.warmup)
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * g["lr_scale"] * multiplier
        self.indexing.vision_projection.train()
        self.ranking.train()
        out = self.losses(self.sample())
        loss = sum(w * out[k] for k, w in self.weights().items() if k in out)
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
            s, done = self.step, self.progress()
            last = done >= 1.0
            if s % self.cfg.log_every == 0 or last:
                per_positive = self.cfg.image_negatives + 3 + int(self.cfg.mlm_with_image)
                pairs = s * self.cfg.batch_size * per_positive
                means = " ".join(f"{k} {np.mean(v):.3f}" for k, v in running.items())
                log.info(
                    f"stage2 step {s}/{self.cfg.steps} {means} "
                    f"hard {schedule.hard_share(self.cfg, done):.2f}"
                    f"@top{self.negatives.hard_k(done)} "
                    f"{pairs / (time.time() - t0):.0f} pair-passes/s"
                )
                running = {}
            if validate and (s % self.cfg.eval_every == 0 or last):
                log.info(f"stage2 step {s} validation: {validate()}")
        return history
