"""Recall@K harness and search logic, with a stand-in scorer (the served loop is in test_search)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edje_client.collection import ImageCollection
from edje_client.evaluation import KarpathyDataset, evaluate_retrieval, markdown_table, recalls
from edje_client.search import rerank_order, search


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_recalls_from_ranks():
    assert recalls(np.array([0, 1, 4, 20])) == {"R@1": 25.0, "R@5": 75.0, "R@10": 75.0}


def test_rerank_never_loses_a_candidate():
    first = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    order = rerank_order(first, np.array([0.1, 3.0, -1.0]))
    assert order.tolist() == [1, 0, 2, 3, 4]
    assert sorted(order) == list(range(5))


def test_oracle_reranker_fixes_every_query_within_k():
    rng = np.random.default_rng(0)
    n_images, per_image = 30, 2
    images = _unit(rng.standard_normal((n_images, 8)))
    owner = np.repeat(np.arange(n_images), per_image)
    texts = _unit(images[owner] + 0.9 * rng.standard_normal((len(owner), 8)))

    def oracle(captions: np.ndarray, imgs: np.ndarray) -> np.ndarray:
        return (owner[captions] == imgs).astype(np.float32)

    kinds = ["plain", "relation"] * n_images
    captions = [f"caption {i}" for i in range(len(owner))]
    names = [f"img{i}.png" for i in range(n_images)]
    report = evaluate_retrieval(
        images,
        texts,
        owner,
        oracle,
        k=10,
        caption_kind=kinds,
        captions=captions,
        image_names=names,
        examples=3,
    )
    t2i = report["text_to_image"]
    assert t2i["reranked"]["R@1"] == t2i["first_stage"]["R@10"]  # every hit in the top 10 moves up
    assert t2i["first_stage"]["R@1"] < t2i["reranked"]["R@1"]
    assert (
        report["image_to_text"]["reranked"]["R@1"] == report["image_to_text"]["first_stage"]["R@10"]
    )
    assert set(report["text_to_image_r1_by_kind"]) == {"plain", "relation"}
    # The hard subset is every kind but plain: here the relation captions (odd indices).
    first_hits = np.argsort(-(texts @ images.T), axis=1)[:, 0] == owner
    hard = report["text_to_image_r1_hard"]
    assert hard["queries"] == n_images
    assert hard["first_stage"] == pytest.approx(100 * first_hits[1::2].mean())
    # Fixed = first-stage top 1 wrong, re-ranked top 1 right; the oracle breaks nothing.
    in_top10 = report["text_to_image"]["first_stage"]["R@10"] / 100 * len(owner)
    assert report["text_to_image_fixed"] == round(in_top10 - first_hits.sum())
    assert report["text_to_image_broken"] == 0
    assert len(report["fixed_examples"]) == 3
    for ex in report["fixed_examples"]:
        q = captions.index(ex["query"])
        assert not first_hits[q] and ex["reranked_top1"] == names[owner[q]]
        assert ex["first_stage_top1"] != ex["reranked_top1"]
    # Re-ranking only permutes the top k: R@10 cannot change.
    assert t2i["reranked"]["R@10"] == t2i["first_stage"]["R@10"]
    table = markdown_table(report)
    assert "| text→image | first stage |" in table and "+ EDJE top-10" in table
    assert "**hard subset**" in table


def test_karpathy_loader(tmp_path):
    data = {
        "images": [
            {
                "filename": "a.png",
                "split": "test",
                "sentences": [{"raw": "x"}, {"raw": "y", "kind": "count"}],
            },
            {"filename": "b.png", "split": "train", "sentences": [{"raw": "z"}]},
        ]
    }
    (tmp_path / "d.json").write_text(json.dumps(data))
    ds = KarpathyDataset.load(tmp_path / "d.json")
    assert ds.images == [tmp_path / "a.png"] and ds.captions == ["x", "y"]
    assert ds.caption_image.tolist() == [0, 0] and ds.caption_kind == [None, "count"]
    with pytest.raises(ValueError, match="no images in split 'val'"):
        KarpathyDataset.load(tmp_path / "d.json", split="val")


class FakeClient:
    """Embeds a text as a fixed vector; scores pairs from a table."""

    def __init__(self, query_vector: np.ndarray, preferred_row: int) -> None:
        self.query_vector, self.preferred_row, self.scored = query_vector, preferred_row, []

    def embed_texts(self, texts):
        return self.query_vector[None]

    def bank_holds(self, collection):
        return False

    def score(self, text, tokens):
        self.scored.append(len(tokens))
        return tokens[:, 0, 0].astype(np.float32)  # the token's first value is its "match"


def test_search_reranks_the_head_and_keeps_the_tail(tmp_path):
    rng = np.random.default_rng(1)
    c = ImageCollection(tmp_path / "c")
    emb = _unit(rng.standard_normal((20, 8)))
    tokens = np.zeros((20, 2, 4), np.float16)
    tokens[7, 0, 0] = 5.0  # EDJE's favourite
    c.add([f"img{i}" for i in range(20)], tokens, emb)
    query = emb[3]  # the first stage's favourite is image 3
    first_order = np.argsort(-(emb @ query))
    client = FakeClient(query, 7)
    out = search(client, c, "q", k=5, rerank_top_k=20)
    assert out.hits[0].id == "img7" and out.hits[0].score == pytest.approx(5.0)
    assert client.scored == [20]
    only_first = search(client, c, "q", k=5, rerank_top_k=0)
    assert [h.row for h in only_first.hits] == first_order[:5].tolist()
    assert all(h.score is None for h in only_first.hits)
    huge = search(client, c, "q", k=100)
    assert sorted(h.row for h in huge.hits) == list(range(20))  # k > collection: everything
    assert set(out.timings_ms) == {"embed_query", "first_stage", "rerank", "total"}
