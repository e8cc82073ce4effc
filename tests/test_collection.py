"""ImageCollection: ANN against exact search, consistency with the token store under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from edje_client.collection import ImageCollection

Q, D, E = 4, 8, 16


def _unit(rng: np.random.Generator, n: int, dim: int = E) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _entry(image_id: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    return rng.standard_normal((Q, D)).astype(np.float16), _unit(rng, 1)[0]


def _add(collection: ImageCollection, ids: list[str]) -> None:
    tokens, embeddings = zip(*(_entry(i) for i in ids), strict=True)
    collection.add(ids, np.stack(tokens), np.stack(embeddings))


def test_exact_search_equals_brute_force_and_persists(tmp_path):
    with ImageCollection(tmp_path / "c") as c:
        _add(c, [f"img{i}" for i in range(300)])
        queries = _unit(np.random.default_rng(1), 20)
        scores, rows = c.search(queries, 10)
        brute = np.argsort(-(queries @ c.embeddings().T), axis=1)[:, :10]
        np.testing.assert_array_equal(rows, brute)
        np.testing.assert_allclose(scores[:, 0], (queries @ c.embeddings().T).max(1), rtol=1e-5)
    reopened = ImageCollection(tmp_path / "c", readonly=True)
    assert reopened.ann_index().ntotal == 300  # loaded from ann.faiss
    np.testing.assert_array_equal(reopened.search(queries, 10)[1], rows)
    assert reopened.ids(rows[0][:2]) == [f"img{r}" for r in rows[0][:2]]


def test_hnsw_recall_against_exact(tmp_path):
    rng = np.random.default_rng(2)
    c = ImageCollection(tmp_path / "c", exact_limit=0)  # force HNSW
    data = _unit(rng, 3000)
    c.add([f"i{n}" for n in range(3000)], np.zeros((3000, Q, D), np.float16), data)
    queries = _unit(rng, 100)
    _, rows = c.search(queries, 10)
    assert hasattr(c.ann_index(), "hnsw")
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact, strict=True)])
    assert recall >= 0.95, recall


def test_k_larger_than_collection_and_empty_collection(tmp_path):
    c = ImageCollection(tmp_path / "c")
    with pytest.raises(LookupError, match="empty"):
        c.search(_unit(np.random.default_rng(0), 1), 5)
    _add(c, ["a", "b", "c"])
    scores, rows = c.search(_unit(np.random.default_rng(0), 2), 50)
    assert rows.shape == (2, 3) and sorted(rows[0]) == [0, 1, 2]


def test_stale_index_is_rebuilt(tmp_path):
    with ImageCollection(tmp_path / "c") as c:
        _add(c, ["a", "b"])
        c.search(_unit(np.random.default_rng(0), 1), 1)
    c = ImageCollection(tmp_path / "c")
    _add(c, ["z"])
    c.store.close()  # a crash: the ANN index on disk still holds two rows
    reopened = ImageCollection(tmp_path / "c", readonly=True)
    assert reopened.ann_index().ntotal == 3
    scores, rows = reopened.search(_entry("z")[1][None], 1)
    assert reopened.ids(rows[0]) == ["z"] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


CHILD = """
import sys, zlib, numpy as np
sys.path.insert(0, {root!r})
from tests.test_collection import _add
from edje_client.collection import ImageCollection
c = ImageCollection({path!r})
n = len(c)
print("ready", flush=True)
while True:
    ids = [f"img{{n + i}}" for i in range(7)]
    _add(c, ids)
    n += 7
    print(" ".join(ids), flush=True)
"""


def test_sigkill_leaves_tokens_and_embeddings_in_agreement(tmp_path):
    path = tmp_path / "c"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reported: list[str] = []
    rng = np.random.default_rng(3)
    for _ in range(12):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD.format(root=root, path=str(path))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        reported += out.split()
        c = ImageCollection(path)
        ids = c.store.ids()
        assert set(reported) <= set(ids)
        embeddings = c.embeddings()
        assert len(embeddings) == len(ids)
        for row, image_id in enumerate(ids):
            tokens, embedding = _entry(image_id)
            np.testing.assert_array_equal(embeddings[row], embedding)
        if ids:
            np.testing.assert_array_equal(c.tokens([len(ids) - 1])[0], _entry(ids[-1])[0])
        c.close()
    assert len(reported) > 0
