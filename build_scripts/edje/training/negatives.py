"""Negative sampling for stage two: each step's positives and their wrong images and captions.

Negatives mix hard ones *mined by the first stage* (its top-k images for a caption, top-k
captions for an image) with random ones, under the curriculum of :mod:`edje.training.schedule`;
on the synthetic world some wrong images are the caption's binding twins, and each positive
also gets a *minimally edited* caption (:func:`edje.synthetic.edit_caption`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import torch

from edje.training import schedule
from edje.training.data import PairData
from edje.training.recipe import StageTwo

CaptionEditor = Callable[[str, random.Random], tuple[str, list[int]] | None]


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


class NegativeSampler:
    """Draws stage two's batches from ``data``, with the hard negatives mined once up front.

    ``rng`` is the trainer's generator (MLM masking draws from it too); ``editor``, if given,
    makes the edited-caption negatives (seeded by ``seed``).
    """

    def __init__(
        self,
        data: PairData,
        cfg: StageTwo,
        caption_emb: torch.Tensor,
        image_emb: torch.Tensor,
        rng: np.random.Generator,
        seed: int = 0,
        editor: CaptionEditor | None = None,
    ) -> None:
        self.data, self.cfg, self.rng, self.editor = data, cfg, rng, editor
        self.edit_rng = random.Random(seed)
        self.hard_images, self.hard_captions = mine_hard(caption_emb, image_emb, data, cfg.hard_k)

    def hard_k(self, progress: float) -> int:
        """How deep in the first stage's ranking hard negatives are drawn now."""
        return schedule.hard_k(self.cfg, progress, self.hard_images.shape[1])

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

    def _wrong_image(self, c: int, g: int, mined: Iterator[int], p: float, twin: float) -> int:
        """A wrong image for caption ``c`` (group ``g``): a binding twin with probability
        ``twin``, else mined with probability ``p``, else random."""
        twins = self.data.twins_of.get(g)
        if twins is not None and self.rng.random() < twin:
            return int(self.rng.choice(twins))
        if self.rng.random() < p:
            return int(self.hard_images[c, next(mined)])
        return self._random_image(g)

    def sample(self, progress: float) -> dict[str, np.ndarray]:
        """Per positive (caption c, image i): ``image_negatives`` wrong images for c, each a
        binding twin, mined (from the first stage's top-k, without repeats) or random; a
        hard-or-random wrong caption for i; and, without a caption editor, one more random
        wrong image for c. With an editor, also c minimally edited (``edit_*``)."""
        cfg, data, rng = self.cfg, self.data, self.rng
        b, n = cfg.batch_size, cfg.image_negatives
        p, k = schedule.hard_share(cfg, progress), self.hard_k(progress)
        twin = schedule.twin_share(cfg, progress)
        cap = rng.integers(len(data.captions), size=b)
        groups = data.caption_group[cap]
        img = np.array([rng.choice(data.images_of[int(g)]) for g in groups])
        neg_img, rand_img, neg_cap = [], [], []
        for c, i, g in zip(cap, img, groups, strict=True):
            mined = iter(rng.permutation(k) if k >= n else rng.integers(k, size=n))
            neg_img.append([self._wrong_image(c, int(g), mined, p, twin) for _ in range(n)])
            if self.editor is None:
                rand_img.append(self._random_image(g))
            neg_cap.append(
                int(self.hard_captions[i, rng.integers(k)])
                if rng.random() < p
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
            edits = [self.editor(data.captions[c], self.edit_rng) for c in cap]
            batch["edit_ok"] = np.array([e is not None for e in edits])
            batch["edit_text"] = [
                e[0] if e else data.captions[c] for e, c in zip(edits, cap, strict=True)
            ]
            batch["edit_words"] = [e[1] if e else [] for e in edits]
        return batch
