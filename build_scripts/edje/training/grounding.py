"""Grounding targets (synthetic world): where in the image each caption word should look.

From the renderer's label maps, every word of a noun phrase ("red", "circle" of "a small red
circle") gets its object's share of each of the Q image cells; optionally each relation word
("left", "above") gets the object it points at. :func:`edje.training.losses.grounding_loss`
teaches the first heads of the first layers to attend that way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from edje import synthetic
from edje.training.data import PairData, patch_object_mix
from edje.world_captions import words as world_words

MAX_COUNT = 4  # the world's largest group; the count head reads 0..MAX_COUNT


def grounding_targets(
    data: PairData,
    batch: dict[str, np.ndarray],
    enc,
    classes: torch.Tensor,
    num_tokens: int,
    relations: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target [B, L, Q], valid [B, L])`` for the positives of ``batch``: per token, the
    share of its object in each image cell (rows sum to 1 where ``valid``).

    ``enc`` is the positives' tokenization (``word_ids``), ``classes`` its tokens' object
    classes (:func:`token_classes`, not modified), ``num_tokens`` Q, a square number.
    """
    q = num_tokens
    cell = data.labels.shape[-1] // math.isqrt(q)
    mix = patch_object_mix(data.labels[torch.as_tensor(batch["img"])], cell)  # [B, Q, C]
    if relations:
        classes = relation_classes(data, batch, enc, classes.clone(), classes.shape[1])
    target = torch.gather(mix, 2, classes[:, None, :].expand(-1, q, -1)).transpose(1, 2)
    total = target.sum(-1, keepdim=True)  # [B, L, 1]
    valid = (classes > 0) & (total.squeeze(-1) > 0)
    return target / total.clamp_min(1e-9), valid


def token_classes(
    data: PairData,
    batch: dict[str, np.ndarray],
    enc,
    length: int,
    phrase_classes: Callable[[str], list[int]],
) -> torch.Tensor:
    """long [B, L]: per token of the positives' captions, the object class its noun phrase
    names (0: none)."""
    classes = torch.zeros(len(batch["cap"]), length, dtype=torch.long)
    for row, c in enumerate(batch["cap"]):
        per_word = phrase_classes(data.captions[c])
        for t, w in enumerate(enc.word_ids(row)[:length]):
            if w is not None:
                classes[row, t] = per_word[w]
    return classes


def count_targets(
    data: PairData, batch: dict[str, np.ndarray], classes: torch.Tensor, images: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target [B, L], valid [B, L])``: for each phrase word of a count caption (``classes``,
    :func:`token_classes`), how many objects of its class ``images`` [B] hold (0 where an
    image holds none: a wrong image's answer too), capped at :data:`MAX_COUNT`."""
    counts = torch.from_numpy(data.class_counts[np.asarray(images)])  # [B, C]
    target = torch.gather(counts, 1, classes).clamp_max(MAX_COUNT)
    counted = torch.tensor([data.caption_kind[c] == "count" for c in batch["cap"]])
    return target, (classes > 0) & counted[:, None]


def relation_classes(
    data: PairData, batch: dict[str, np.ndarray], enc, classes: torch.Tensor, length: int
) -> torch.Tensor:
    """Give each relation word ("left", "above", ...) of a two-object caption the class of
    the object it points at in this image (label-map centroids), so that a grounding head
    learns *where*: "left" looks at whatever is further left."""
    labels = data.labels[torch.as_tensor(batch["img"])]
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
        words = world_words(data.captions[c])
        for t, w in enumerate(enc.word_ids(row)[:length]):
            if w is None or words[w] not in synthetic.RELATION_POINTS:
                continue
            axis, sign = synthetic.RELATION_POINTS[words[w]]
            further = int(sign * (centre[1][axis] - centre[0][axis]) > 0)
            classes[row, t] = present[further]
    return classes
