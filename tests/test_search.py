"""The whole loop against the real server: index a generated collection, search it, evaluate it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edje.synthetic import write_karpathy
from edje_client import EDJEClient
from edje_client.cli import main
from edje_client.collection import ImageCollection
from edje_client.evaluation import KarpathyDataset
from edje_client.search import search


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_karpathy(
        tmp_path_factory.mktemp("data"), "test", seed=0, max_scenes=24, captions_per_image=2
    )


@pytest.fixture(scope="module")
def store(triton_server, dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "store"
    args = [
        "index",
        str(dataset.parent / "images"),
        "--store",
        str(path),
        "--url",
        triton_server.grpc_url,
    ]
    assert main(args) == 0
    return path


def test_index_fills_tokens_embeddings_and_index_in_step(store):
    collection = ImageCollection(store, readonly=True)
    assert len(collection) == 24
    assert collection.embeddings().shape == (24, 64)
    np.testing.assert_allclose(np.linalg.norm(collection.embeddings(), axis=1), 1.0, atol=1e-5)
    assert collection.spec.embedding_dim == 64 and collection.first_stage.indexed_rows() is None


def test_search_reranks_with_edje_scores(store, triton_server, protocol):
    collection = ImageCollection(store, readonly=True)
    with EDJEClient(triton_server.url(protocol), protocol) as client:
        response = search(
            client, collection, "a red circle left of a blue square", k=30, rerank_top_k=10
        )
        first_scores, rows = collection.search(
            client.embed_texts(["a red circle left of a blue square"]), 24
        )
        expected = client.score(
            "a red circle left of a blue square", collection.tokens(rows[0][:10])
        )
    assert len(response.hits) == 24  # k larger than the collection: all of it, nothing lost
    head = response.hits[:10]
    assert sorted(h.row for h in head) == sorted(rows[0][:10].tolist())
    scores = [h.score for h in head]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(sorted(scores, reverse=True), np.sort(expected)[::-1], rtol=1e-5)
    assert [h.row for h in response.hits[10:]] == rows[0][10:].tolist()
    assert all(h.score is None for h in response.hits[10:])


def test_search_and_eval_commands(store, dataset, triton_server, tmp_path, capsys):
    server = ["--url", triton_server.http_url, "--protocol", "http"]
    assert (
        main(["search", "two red circles", "--store", str(store), "-k", "3", "--timings", *server])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["rank", "edje", "first", "was", "id"] and len(out) == 5
    assert "first_stage" in out[-1] and "rerank" in out[-1]

    assert main(["eval", str(dataset), "--out", str(tmp_path / "report"), *server]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    ds = KarpathyDataset.load(dataset)
    assert report["num_images"] == 24 and report["num_captions"] == len(ds.captions) == 48
    for direction in ("text_to_image", "image_to_text"):
        first, after = report[direction]["first_stage"], report[direction]["reranked"]
        assert all(0 <= v <= 100 for v in (*first.values(), *after.values()))
        assert first["R@10"] == after["R@10"]  # re-ranking the top 10 only reorders them
    assert set(report["text_to_image_r1_by_kind"]) <= {
        "plain",
        "relation",
        "attribute_swap",
        "count",
    }
    assert "| text→image | first stage |" in (tmp_path / "report.md").read_text()


def test_empty_store_and_missing_images_are_clear(tmp_path, triton_server, capsys):
    (tmp_path / "empty").mkdir()
    server = ["--url", triton_server.grpc_url]
    assert main(["search", "dog", "--store", str(tmp_path / "empty"), *server]) == 2
    assert "no collection at" in capsys.readouterr().err
    (tmp_path / "d.json").write_text(
        json.dumps({"images": [{"filename": "nope.png", "sentences": [{"raw": "x"}]}]})
    )
    assert main(["eval", str(tmp_path / "d.json"), *server]) == 2
    assert "images not found" in capsys.readouterr().err
