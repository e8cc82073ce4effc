"""edje_rank_by_id: a server-resident token bank, against token passing, under live updates."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edje.build_repo import RepoSettings, build_repository
from edje_client import EDJEClient, InvalidInputError
from edje_client.collection import ImageCollection
from edje_client.search import search
from edje_client.server import TritonServer
from tests.triton_stub import load_model

N = 40


def _entries(start: int, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(start)
    emb = rng.standard_normal((n, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return (
        [f"img{i}" for i in range(start, start + n)],
        rng.standard_normal((n, 64, 384)).astype(np.float16),
        emb,
    )


@pytest.fixture(scope="module")
def bank_server(tiny_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    collection = ImageCollection(root / "store")
    collection.add(*_entries(0, N))
    repo = build_repository(
        tiny_source, root / "repo", RepoSettings(token_bank=str(root / "store"))
    )
    with TritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, log_file=root / "log"
    ) as server:
        yield server, collection
    collection.close()


def test_rank_by_id_equals_token_passing(bank_server, protocol):
    server, collection = bank_server
    with EDJEClient(server.url(protocol), protocol) as client:
        assert client.bank_holds(collection)
        rows = np.array([3, 0, 39, 7, 7])
        by_id = client.score_rows("a red circle left of a blue square", rows)
        by_tokens = client.score("a red circle left of a blue square", collection.tokens(rows))
        np.testing.assert_allclose(by_id, by_tokens, rtol=1e-5, atol=1e-6)
        auto = client.rerank_collection("dog", collection, top_n=5)
        forced = client.rerank_collection("dog", collection, top_n=5, by_id=False)
        assert [r.id for r in auto] == [r.id for r in forced]
        np.testing.assert_allclose([r.score for r in auto], [r.score for r in forced], rtol=1e-5)
        query = collection.embeddings()[11]
        client.embed_texts = lambda texts: query[None]  # pin the first stage's query vector
        a = search(client, collection, "q", k=10)
        b = search(client, collection, "q", k=10, by_id=False)
        assert [h.id for h in a.hits] == [h.id for h in b.hits]


def test_unknown_ids_are_invalid_arg_and_named(bank_server, protocol):
    server, _ = bank_server
    with EDJEClient(server.url(protocol), protocol) as client:
        for bad in ([1, N + 5], [-1]):
            with pytest.raises(InvalidInputError, match=f"unknown image id {bad[-1]}"):
                client.score_rows("dog", np.array(bad))
        assert client.score_rows("dog", np.array([1])).shape == (1,)  # still serving


def test_new_images_become_rankable_without_restart(bank_server):
    server, collection = bank_server
    failures, calls, stop = [], [0], threading.Event()

    def hammer() -> None:
        with EDJEClient(server.grpc_url) as client:
            while not stop.is_set():
                try:
                    client.score_rows("dog", np.arange(0, N, 5))
                    calls[0] += 1
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        with EDJEClient(server.grpc_url) as client:
            for start in range(N, N + 30, 10):
                ids, tokens, emb = _entries(start, 10)
                collection.add(ids, tokens, emb)  # committed: visible from the next request
                rows = np.arange(start, start + 10)
                np.testing.assert_allclose(
                    client.score_rows("dog", rows),
                    client.score("dog", tokens),
                    rtol=1e-5,
                    atol=1e-6,
                )
                time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and calls[0] > 0


def test_bank_too_large_for_memory_is_refused_at_load(bank_server, tmp_path):
    server, _ = bank_server
    repo = server.model_repository
    with pytest.raises(MemoryError, match="more than the 0.0 GB allowed"):
        load_model(repo / "edje_token_bank", max_bank_bytes="1000")
    model, _ = load_model(repo / "edje_token_bank")
    assert len(model.bank) >= N


def test_cli_rerank_by_id(bank_server, capsys):
    from edje_client.cli import main

    server, collection = bank_server
    args = [
        "rerank",
        "dog",
        "--collection",
        str(collection.path),
        "--top-n",
        "3",
        "--url",
        server.grpc_url,
    ]
    assert main([*args, "--by-id"]) == 0
    by_id = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == by_id and len(by_id.splitlines()) == 4


def test_bank_store_follows_appends_compaction_and_retries_a_failed_read(tmp_path):
    from edje.tools.bench_collections import load_bank_module

    collection = ImageCollection(tmp_path / "c")
    collection.add(*_entries(0, 10))
    bank = load_bank_module().TokenBank(str(tmp_path / "c"), 1 << 30, (64, 384))
    assert len(bank) == 10
    collection.add(*_entries(10, 5))
    bank.max_bytes = 10 * 64 * 384 * 2  # the new rows no longer fit
    with pytest.raises(MemoryError, match="shard it"):
        bank.refresh()
    assert len(bank) == 10  # nothing half-read, and the next refresh tries again
    bank.max_bytes = 1 << 30
    assert bank.refresh() == 5 and len(bank) == 15
    collection.optimize()  # a new version, the same rows: nothing to read, and no stale files
    assert bank.refresh() == 0 and bank.dataset.version == collection.version
    rows = np.array([14, 0, 7])
    np.testing.assert_array_equal(bank.gather(rows), collection.tokens(rows))
