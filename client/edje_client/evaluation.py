"""Recall@K for text->image and image->text retrieval: first stage alone vs EDJE re-ranking.

The one evaluation stack: ``edje eval`` (through the server) and training's evaluation
(``python -m edje.train evaluate``, with torch) both hand their score matrices to
:func:`rerank_report`, so their reports have the same keys.

Reads datasets in the Karpathy JSON format of the Flickr30k and COCO evaluations::

    {"images": [{"filename": "1000092795.jpg", "filepath": "...", "split": "test",
                 "sentences": [{"raw": "Two young guys ...", "kind": "relation"}, ...]}, ...]}

As in the paper, the first stage ranks the whole collection by cosine similarity of SigLIP
embeddings and EDJE re-ranks the first stage's top ``k`` (10 by default). An optional ``kind``
field on a sentence (e.g. ``"relation"``) adds text->image R@1 per kind to the report, and over
the *hard subset* (:func:`is_hard`): every caption with a kind other than ``"plain"``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edje_client.search import rerank_order

KS = (1, 5, 10)
PLAIN_KIND = "plain"  # the one caption kind outside the hard subset


@dataclass
class KarpathyDataset:
    """One split: image paths, captions, and which image each caption describes."""

    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # int [num_captions]
    caption_kind: list[str | None]

    @classmethod
    def load(cls, path: str | Path, split: str = "test", image_root: str | Path | None = None):
        """Read a Karpathy JSON; image paths are relative to ``image_root`` (default: its dir)."""
        path = Path(path)
        root = Path(image_root) if image_root else path.parent
        data = json.loads(path.read_text())
        images, captions, owner, kinds = [], [], [], []
        for entry in data["images"]:
            if split and entry.get("split", split) != split:
                continue
            images.append(root / entry.get("filepath", "") / entry["filename"])
            for sentence in entry["sentences"]:
                captions.append(sentence["raw"])
                owner.append(len(images) - 1)
                kinds.append(sentence.get("kind"))
        if not images:
            raise ValueError(f"{path} has no images in split {split!r}")
        return cls(images, captions, np.array(owner, dtype=np.int64), kinds)


def is_hard(kind: str | None) -> bool:
    """Whether a caption of ``kind`` is in the *hard subset*: every tagged kind but plain."""
    return kind is not None and kind != PLAIN_KIND


def recalls(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """R@K in percent from the 0-based rank of each query's first relevant item."""
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def first_stage_order(sims: np.ndarray) -> np.ndarray:
    """Each row's items, best first by first-stage similarity (ties: the lower index first)."""
    return np.argsort(-sims, axis=1, kind="stable")


def first_relevant_rank(order: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """For each row of ``order`` (item ids, best first), the position of the first relevant."""
    hits = relevant[np.arange(len(order))[:, None], order]
    return np.where(hits.any(1), hits.argmax(1), order.shape[1])


def _rerank(
    order: np.ndarray,
    sims: np.ndarray,
    k: int,
    pair_scores: Callable[[np.ndarray, np.ndarray], np.ndarray],
    query_is_text: bool,
) -> np.ndarray:
    """Re-order each row's top ``k`` with EDJE; ``pair_scores(caption_idx, image_idx)``."""
    k = min(k, order.shape[1])
    queries = np.repeat(np.arange(len(order)), k)
    candidates = order[:, :k].reshape(-1)
    captions, images = (queries, candidates) if query_is_text else (candidates, queries)
    scores = np.asarray(pair_scores(captions, images)).reshape(len(order), k)
    out = order.copy()
    for q in range(len(order)):
        first = sims[q, order[q, :k]]
        out[q, :k] = order[q, :k][rerank_order(first, scores[q])]
    return out


def _r1(first: np.ndarray, after: np.ndarray, mask: np.ndarray) -> dict:
    """Text->image R@1 over the queries in ``mask``, first stage and re-ranked."""
    return {
        "queries": int(mask.sum()),
        "first_stage": float(100 * np.mean(first[mask] < 1)),
        "reranked": float(100 * np.mean(after[mask] < 1)),
    }


def rerank_report(
    sims: np.ndarray,
    relevant: np.ndarray,
    pair_scores: Callable[[np.ndarray, np.ndarray], np.ndarray],
    k: int = 10,
    image_to_text: bool = True,
    caption_kind: Sequence[str | None] | None = None,
    captions: Sequence[str] | None = None,
    image_names: Sequence[str] | None = None,
    examples: int = 5,
) -> dict:
    """Recall@1/5/10, first stage and re-ranked, from score matrices.

    ``sims`` [captions, images] are first-stage similarities and ``relevant`` (same shape,
    bool) says which images each caption describes. ``pair_scores(caption_indices,
    image_indices)`` returns EDJE's logit for each pair: it is called once per direction,
    with each query's first ``k`` candidates (:func:`first_stage_order`), query after query.
    ``image_to_text=False`` leaves that direction out. With ``captions``, the report lists up
    to ``examples`` text queries that re-ranking fixed (the first stage's top 1 was wrong, the
    re-ranked top 1 is right), named by ``image_names``.
    """
    n_captions, n_images = sims.shape
    t2i_order = first_stage_order(sims)
    t2i_rerank = _rerank(t2i_order, sims, k, pair_scores, query_is_text=True)
    t2i_first = first_relevant_rank(t2i_order, relevant)
    t2i_after = first_relevant_rank(t2i_rerank, relevant)
    report = {
        "k": k,
        "num_images": n_images,
        "num_captions": n_captions,
        "text_to_image": {"first_stage": recalls(t2i_first), "reranked": recalls(t2i_after)},
    }
    if image_to_text:
        i2t_order = first_stage_order(sims.T)
        i2t_rerank = _rerank(i2t_order, sims.T, k, pair_scores, query_is_text=False)
        report["image_to_text"] = {
            "first_stage": recalls(first_relevant_rank(i2t_order, relevant.T)),
            "reranked": recalls(first_relevant_rank(i2t_rerank, relevant.T)),
        }
    fixed = (t2i_first >= 1) & (t2i_after < 1)
    report["text_to_image_fixed"] = int(fixed.sum())
    report["text_to_image_broken"] = int(((t2i_first < 1) & (t2i_after >= 1)).sum())
    if captions is not None:
        name = (lambda i: image_names[i]) if image_names else int
        report["fixed_examples"] = [
            {
                "caption": int(q),
                "query": captions[q],
                "first_stage_top1": name(int(t2i_order[q, 0])),
                "reranked_top1": name(int(t2i_rerank[q, 0])),
            }
            for q in np.flatnonzero(fixed)[:examples]
        ]
    kinds = sorted({c for c in caption_kind or [] if c})
    if kinds:
        hard = np.array([is_hard(c) for c in caption_kind])
        if hard.any():
            report["text_to_image_r1_hard"] = _r1(t2i_first, t2i_after, hard)
        report["text_to_image_r1_by_kind"] = {
            kind: _r1(t2i_first, t2i_after, mask)
            for kind in kinds
            if (mask := np.array([c == kind for c in caption_kind])).any()
        }
    return report


def evaluate_retrieval(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    caption_image: np.ndarray,
    pair_scores: Callable[[np.ndarray, np.ndarray], np.ndarray],
    k: int = 10,
    caption_kind: list[str | None] | None = None,
    captions: list[str] | None = None,
    image_names: list[str] | None = None,
    examples: int = 5,
) -> dict:
    """Recall@1/5/10 both ways, first stage and re-ranked (see :func:`rerank_report`).

    ``caption_image`` is the image each caption describes; ``pair_scores(caption_indices,
    image_indices)`` returns EDJE's logit for each pair.
    """
    sims = text_embeddings @ image_embeddings.T  # [captions, images]
    relevant = caption_image[:, None] == np.arange(len(image_embeddings))[None, :]
    return rerank_report(
        sims, relevant, pair_scores, k, True, caption_kind, captions, image_names, examples
    )


def markdown_table(report: dict) -> str:
    """The report as a markdown table (first stage vs re-ranked, both directions)."""
    head = "| Direction | Stage | " + " | ".join(f"R@{k}" for k in KS) + " |"
    lines = [head, "|" + " --- |" * (2 + len(KS))]
    for direction, title in (("text_to_image", "text→image"), ("image_to_text", "image→text")):
        if direction not in report:
            continue
        for stage, name in (
            ("first_stage", "first stage"),
            ("reranked", f"+ EDJE top-{report['k']}"),
        ):
            values = " | ".join(f"{report[direction][stage][f'R@{k}']:.1f}" for k in KS)
            lines.append(f"| {title} | {name} | {values} |")
    if "text_to_image_r1_by_kind" in report:
        lines += [
            "",
            "| Caption kind | Queries | First-stage R@1 | Re-ranked R@1 |",
            "| --- | --- | --- | --- |",
        ]
        rows = list(report["text_to_image_r1_by_kind"].items())
        if "text_to_image_r1_hard" in report:
            rows.append(("**hard subset** (all but plain)", report["text_to_image_r1_hard"]))
        for kind, row in rows:
            lines.append(
                f"| {kind} | {row['queries']} | {row['first_stage']:.1f} | {row['reranked']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def evaluate_with_client(
    client, dataset: KarpathyDataset, k: int = 10, progress: bool = False, indexed=None
) -> dict:
    """Index ``dataset`` through the server (unless ``indexed``, an ``IndexResult``, is given),
    embed its captions, and evaluate (see :func:`evaluate_retrieval`). ``client`` is an
    :class:`~edje_client.EDJEClient`."""
    if indexed is None:
        indexed = client.index(dataset.images, progress=progress)
    text_embeddings = client.embed_texts(dataset.captions, progress=progress)

    def pair_scores(captions: np.ndarray, images: np.ndarray) -> np.ndarray:
        texts = [dataset.captions[i] for i in captions]
        return client.score(texts, indexed.tokens[images], progress=progress)

    return evaluate_retrieval(
        indexed.embeddings,
        text_embeddings,
        dataset.caption_image,
        pair_scores,
        k,
        dataset.caption_kind,
        captions=dataset.captions,
        image_names=[p.name for p in dataset.images],
    )
