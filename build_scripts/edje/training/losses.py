"""Stage two's losses, one function each, over one forward pass of the batch's pairs.

Rows of the pair pass (B positives each): ``0`` (caption c, its image i); ``1..n`` (c, a wrong
image); ``n+1`` (c minimally edited, i) or, without an editor, (c, a random image); ``n+2``
(a wrong caption, i). The losses:

* ITM: binary cross-entropy on positives and negatives, and a listwise cross-entropy over
  (positive, negatives) per caption and per image;
* word-level contradiction (synthetic world): a training-only head marks which words of the
  edited caption the image contradicts;
* grounding (synthetic world): attention of the first heads of the first layers from each
  word of a noun phrase to the image cells that hold its object (:mod:`.grounding`), and
  optionally a training-only head that reads the object's position off each such word;
* ITC: the joint encoder's text-only ``[CLS]`` through ``text_projection`` regressed (cosine)
  onto the first stage's text embedding;
* MLM on the captions through ``language_model.cls``, conditioned on the image; on the world,
  each caption masks *every* word of one kind (:class:`WordGroupMasker`);
* optional distillation of the first stage's scores over each caption's image candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DataCollatorForLanguageModeling

from edje.modeling import EDJEModelForRanking
from edje.training.data import encode_captions, encode_edits, word_group_ids


def pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` [B, L] cut or zero-padded to ``length`` columns."""
    if t.shape[1] >= length:
        return t[:, :length] if t.shape[1] > length else t
    return F.pad(t, (0, length - t.shape[1]))


@dataclass
class PairPass:
    """One step's pair rows through the joint encoder (layout in the module docstring)."""

    logits: torch.Tensor  # [n + 3, B]
    keep: torch.Tensor  # [n + 3, B]: 0 where a row is left out (an edit that changed nothing)
    kept: torch.Tensor  # the logits where left-out rows can never win
    hidden: torch.Tensor  # [(n + 3) B, T, D]
    attentions: tuple | None  # per layer, with grounding
    ids: torch.Tensor  # the positives' captions [B, L], padded to the pass's text length
    mask: torch.Tensor
    enc: object  # the positives' tokenization (word ids)
    third_mask: torch.Tensor  # row n + 1's text mask
    edit_labels: torch.Tensor | None  # [B, L]: 1 on edited words (with an editor)
    pos_tok: torch.Tensor  # the positives' image tokens [B, Q, D]
    image_side: list[int]  # rows that are (c, an image): the caption's candidates
    caption_side: list[int]  # rows that are (a caption, i): the image's candidates


def forward_pairs(
    ranking: EDJEModelForRanking,
    tokens_of,
    tokenizer,
    captions: Sequence[str],
    batch: dict,
    edited: bool,
    attentions: bool,
    device: torch.device,
) -> PairPass:
    """Run every pair row of ``batch`` through the joint encoder once.

    ``tokens_of(image_indices)`` gives image tokens [n, Q, D]; ``edited``: ``batch`` holds
    edited captions; ``attentions``: keep the attention maps (eager attention).
    """
    b, n = batch["neg_img"].shape
    images = [batch["img"], batch["neg_img"].T.reshape(-1)] + (
        [] if edited else [batch["rand_img"]]
    )
    pos_tok, *neg_tok = tokens_of(np.concatenate(images)).split(b)  # (n + 1 or 2) x [B, Q, D]

    def encode(idx):
        enc = encode_captions(tokenizer, [captions[i] for i in idx])
        return enc["input_ids"].to(device), enc["attention_mask"].to(device), enc

    ids, mask, enc = encode(batch["cap"])
    edit_labels = None
    if edited:
        third_ids, third_mask, edit_labels = encode_edits(
            tokenizer, batch["edit_text"], batch["edit_words"]
        )
        third_ids, third_mask, third_tok = third_ids.to(device), third_mask.to(device), pos_tok
    else:
        third_ids, third_mask, third_tok = ids, mask, neg_tok.pop()  # (caption, random image)
    neg_ids, neg_mask, _ = encode(batch["neg_cap"])
    length = max(ids.shape[1], neg_ids.shape[1], third_ids.shape[1])
    if edited:
        edit_labels = pad_to(edit_labels, length)
    ids, mask, third_ids, third_mask = (
        pad_to(t, length) for t in (ids, mask, third_ids, third_mask)
    )
    out = ranking.pair_hidden_states(
        torch.cat([pos_tok, *neg_tok, third_tok, pos_tok]),
        torch.cat([ids] * (n + 1) + [third_ids, pad_to(neg_ids, length)]),
        torch.cat([mask] * (n + 1) + [third_mask, pad_to(neg_mask, length)]),
        output_attentions=attentions,
    )
    logits = ranking.classification_head(out.last_hidden_state).squeeze(-1).view(n + 3, b)
    keep = torch.ones_like(logits)
    if edited:  # an edit that found nothing to change leaves a positive: leave it out
        keep[n + 1] = torch.from_numpy(batch["edit_ok"]).float()
    return PairPass(
        logits,
        keep,
        logits + (keep - 1) * 1e4,
        out.last_hidden_state,
        out.attentions if attentions else None,
        ids,
        mask,
        enc,
        third_mask,
        edit_labels,
        pos_tok,
        image_side=list(range(n + 1)) + ([] if edited else [n + 1]),
        caption_side=[0, n + 1, n + 2] if edited else [0, n + 2],
    )


def itm_loss(p: PairPass) -> torch.Tensor:
    """Binary cross-entropy: row 0 matches, every other row does not (positives up-weighted)."""
    labels = torch.zeros_like(p.logits)
    labels[0] = 1.0
    rows = torch.tensor(len(p.logits) - 1.0, device=p.logits.device)
    return F.binary_cross_entropy_with_logits(p.logits, labels, weight=p.keep, pos_weight=rows)


def rank_loss(p: PairPass) -> torch.Tensor:
    """Listwise: the caption's own image among its image candidates, and the image's own
    caption among its caption candidates."""
    zero = torch.zeros(p.logits.shape[1], dtype=torch.long, device=p.logits.device)
    return F.cross_entropy(p.logits[p.image_side].T, zero) + F.cross_entropy(
        p.kept[p.caption_side].T, zero
    )


def accuracy(p: PairPass) -> torch.Tensor:
    """How often the positive beats every negative of its column (not a loss)."""
    return (p.logits[0] > p.kept[1:].max(0).values).float().mean().detach()


def contradiction_loss(p: PairPass, head: nn.Linear) -> torch.Tensor:
    """Which words does the image contradict? Per token of the positive (none) and of the
    edited caption (the edited words), through the training-only ``head``."""
    n_rows, b = p.logits.shape
    edit_row = n_rows - 2
    hidden = p.hidden.view(n_rows, b, -1, p.hidden.shape[-1])[[0, edit_row], :, : p.ids.shape[1]]
    word_mask = torch.stack([p.mask, p.third_mask]).float()
    word_mask[1] *= p.keep[edit_row][:, None]
    labels = torch.stack([torch.zeros_like(p.edit_labels), p.edit_labels]).to(p.logits.device)
    bce = F.binary_cross_entropy_with_logits(head(hidden).squeeze(-1), labels, reduction="none")
    return (bce * word_mask).sum() / word_mask.sum()


def grounding_loss(
    p: PairPass, target: torch.Tensor, valid: torch.Tensor, heads: int, layers: int
) -> torch.Tensor:
    """Cross-entropy of the first ``heads`` heads' attention, in the first ``layers`` layers,
    from each phrase word of a positive to the image cells, against ``target`` [B, L, Q]
    (:func:`edje.training.grounding.grounding_targets`) where ``valid`` [B, L]."""
    if not valid.any():
        return p.mask.new_zeros((), dtype=torch.float)
    device, (b, length), q = p.mask.device, p.mask.shape, target.shape[-1]
    target, valid = target.to(device), valid.to(device)
    lengths = p.mask.long().sum(1)  # text length of each pair row; its image follows
    cols = (lengths[:, None] + torch.arange(q, device=device))[:, None, :]  # [B, 1, Q]
    loss = []
    for layer in p.attentions[:layers]:
        att = layer[:b, :heads, :length]  # [B, H, L, T]
        att = torch.gather(att, 3, cols[:, None].expand(-1, att.shape[1], length, -1))
        ce = -(target[:, None] * torch.log(att + 1e-9)).sum(-1)  # [B, H, L]
        loss.append(ce.permute(0, 2, 1)[valid].mean())
    return torch.stack(loss).mean()


def cell_centres(q: int) -> torch.Tensor:
    """``[Q, 2]`` (x, y) centres of a square grid of ``q`` image cells, in [-1, 1], row-major."""
    side = math.isqrt(q)
    axis = (torch.arange(side, dtype=torch.float) + 0.5) / side * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


def where_loss(
    p: PairPass,
    head: nn.Linear,
    target: torch.Tensor,
    valid: torch.Tensor,
    rows: Sequence[int] = (0,),
) -> torch.Tensor:
    """Squared error of ``head`` on each phrase word's last hidden state against the centre of
    its grounding ``target`` over the image cells, where ``valid``. ``rows`` are the pair rows
    read (0: the positives; 1..n: the caption with a wrong image), ``target`` [R B, L, Q] and
    ``valid`` [R B, L] their targets in that order, each from the row's own image."""
    if not valid.any():
        return p.mask.new_zeros((), dtype=torch.float)
    device, q = p.mask.device, target.shape[-1]
    centre = target.to(device) @ cell_centres(q).to(device)  # [R B, L, 2]
    return ((head(_row_states(p, rows)) - centre) ** 2).sum(-1)[valid.to(device)].mean()


def _row_states(p: PairPass, rows: Sequence[int]) -> torch.Tensor:
    """``[R B, L, H]``: the text positions' last hidden states of pair rows ``rows`` in order
    (0: the positives; 1..n: the caption with its wrong images)."""
    b, length = p.mask.shape
    return torch.cat([p.hidden[r * b : (r + 1) * b, :length] for r in rows])


def count_loss(
    p: PairPass,
    head: nn.Linear,
    target: torch.Tensor,
    valid: torch.Tensor,
    rows: Sequence[int] = (0,),
) -> torch.Tensor:
    """Cross-entropy of ``head`` (one logit per count, 0..max) on each phrase word's last hidden
    state against how many objects of its class the row's image holds, where ``valid``.
    ``rows``, ``target`` [R B, L] and ``valid`` [R B, L] as in :func:`where_loss`."""
    if not valid.any():
        return p.mask.new_zeros((), dtype=torch.float)
    valid = valid.to(p.mask.device)
    return F.cross_entropy(head(_row_states(p, rows))[valid], target.to(valid.device)[valid])


def itc_loss(
    ranking: EDJEModelForRanking,
    text_projection: nn.Linear,
    p: PairPass,
    target: torch.Tensor,
) -> torch.Tensor:
    """Text-only ``[CLS]`` -> ``text_projection`` against the first stage's text embedding."""
    hidden = ranking.language_model.bert(input_ids=p.ids, attention_mask=p.mask)
    cls = hidden.last_hidden_state[:, 0]
    return (1 - F.cosine_similarity(text_projection(cls), target)).mean()


class WordGroupMasker:
    """MLM inputs and labels (-100: not masked) for text-only tokenizations.

    Given word groups (:data:`edje.synthetic.WORD_GROUPS`), each caption masks every word of
    one group it uses, so the image must answer (which colour is the circle?); otherwise the
    collator's random masking (``probability``) of any word. Draws from ``rng``.
    """

    def __init__(
        self,
        tokenizer,
        rng: np.random.Generator,
        probability: float,
        seed: int = 0,
        groups: Sequence[Sequence[str]] | None = None,
    ) -> None:
        self.tokenizer, self.rng = tokenizer, rng
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=probability, seed=seed
        )
        self.word_group = None if groups is None else word_group_ids(tokenizer, groups)
        self.num_groups = 0 if groups is None else len(groups)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.word_group is None:
            tok = self.tokenizer
            special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (mask == 0)
            return self.collator.torch_mask_tokens(ids.clone(), special)
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


def mlm_loss(
    ranking: EDJEModelForRanking,
    p: PairPass,
    masked: torch.Tensor,
    labels: torch.Tensor,
    with_image: bool,
) -> torch.Tensor:
    """Masked-word cross-entropy on the positives' captions, with their image unless not
    ``with_image``; 0 when nothing was masked."""
    if not (labels >= 0).any():
        return p.logits.new_zeros(())
    if with_image:
        out = ranking.pair_hidden_states(p.pos_tok, masked, p.mask)
        hidden = out.last_hidden_state[:, : p.ids.shape[1]]
    else:
        hidden = ranking.language_model.bert(input_ids=masked, attention_mask=p.mask)
        hidden = hidden.last_hidden_state
    # The vocabulary projection only where a word was masked (30k outputs per position).
    chosen = labels >= 0
    logits = ranking.language_model.cls(hidden[chosen])
    return F.cross_entropy(logits, labels[chosen])


def distill_loss(p: PairPass, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL from the first stage's softmax over each caption's image candidates (``teacher``
    [B, candidates], in ``p.image_side`` order): a dense target over the twins while the
    joint encoder learns what the first stage already knows."""
    return F.kl_div(
        F.log_softmax(p.logits[p.image_side].T, dim=1),
        F.softmax(teacher / temperature, dim=1),
        reduction="batchmean",
    )
