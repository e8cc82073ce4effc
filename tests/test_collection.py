"""ImageCollection on Lance: format, validation, readers, mismatches, first-stage search.

The SIGKILL loop and the disk bound live in tests/test_collection_crash.py.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from edje_client.collection import (
    CollectionError,
    CollectionMismatchError,
    CollectionSpec,
    DuplicateIdError,
    ImageCollection,
)
from edje_client.first_stage import index_action

Q, D, E = 4, 8, 16
SPEC = CollectionSpec(Q, D, E, model_id="sha256:test")


def _unit(rng: np.random.Generator, n: int, dim: int = E) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def entry(image_id: str, q: int = Q, d: int = D, e: int = E) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and embedding derived from the id alone."""
    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    return rng.standard_normal((q, d)).astype(np.float16), _unit(rng, 1, e)[0]


def add(collection: ImageCollection, ids: list[str], **metadata) -> None:
    tokens, embeddings = zip(*(entry(i) for i in ids), strict=True)
    collection.add(ids, np.stack(tokens), np.stack(embeddings), metadata or None)


# ------------------------------------------------------------------ format and rows


def test_roundtrip_schema_rows_and_metadata(tmp_path: Path) -> None:
    c = ImageCollection(tmp_path / "c", spec=SPEC)
    keys = ["z", "a", "m", "b", "y"]
    add(c, keys[:2], path=["/p/z", "/p/a"])
    add(c, keys[2:], path=["/p/m", "/p/b", "/p/y"])
    reopened = ImageCollection(tmp_path / "c", readonly=True)
    assert reopened.spec == SPEC and len(reopened) == 5
    assert reopened.ids() == keys and reopened.ids([4, 0]) == ["y", "z"]
    np.testing.assert_array_equal(reopened.rows_of(["m", "z", "m"]), [2, 0, 2])
    np.testing.assert_array_equal(reopened.get(keys), np.stack([entry(k)[0] for k in keys]))
    np.testing.assert_array_equal(reopened.embeddings(), np.stack([entry(k)[1] for k in keys]))
    assert reopened.metadata([3]) == [{"path": "/p/b"}] and reopened.metadata_columns == ["path"]
    assert "m" in reopened and "q" not in reopened and 3 not in reopened
    assert reopened.tokens(np.array([], dtype=np.int64)).shape == (0, Q, D)
    # The format as documented: columns, types and the schema metadata.
    ds = lance.dataset(str(tmp_path / "c"))
    assert ds.schema.field("tokens").type == pa.list_(pa.float16(), Q * D)
    assert ds.schema.field("embedding").type == pa.list_(pa.float32(), E)
    meta = json.loads(ds.schema.metadata[b"edje"])
    assert meta == {
        "format": "edje-collection",
        "version": 2,
        "num_tokens": Q,
        "token_width": D,
        "embedding_dim": E,
        "token_dtype": "float16",
        "model_id": "sha256:test",
    }
    assert [list(i.field_names) for i in ds.describe_indices()] == [["id"]]
    with pytest.raises(IndexError, match="row 5"):
        reopened.tokens([5])
    with pytest.raises(KeyError, match="'nope'"):
        reopened.get(["a", "nope"])
    with pytest.raises(TypeError, match="single string"):
        reopened.get("a")


def test_real_size_bytes_on_disk(tmp_path: Path) -> None:
    spec = CollectionSpec(64, 384, 256)
    c = ImageCollection(tmp_path / "c", spec=spec)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 64, 384)).astype(np.float16)
    c.add([f"i{n}" for n in range(200)], x, _unit(rng, 200, 256))
    np.testing.assert_array_equal(c.tokens([199, 3]), x[[199, 3]])
    info = c.info()
    assert spec.bytes_per_image == 49_152 + 1024
    assert spec.bytes_per_image <= info["bytes_per_image"] < 1.05 * spec.bytes_per_image


def test_ids_with_quotes_and_unicode(tmp_path: Path) -> None:
    c = ImageCollection(tmp_path / "c")
    keys = ["it's", 'say "hi"', "back\\slash", "ü/ñ.jpg", "a) OR (1=1", "%_*"]
    add(c, keys)
    assert c.existing(keys + ["its"]) == set(keys)
    np.testing.assert_array_equal(c.rows_of(keys[::-1]), np.arange(6)[::-1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tokens_rejected(tmp_path: Path, bad: float) -> None:
    c = ImageCollection(tmp_path / "c", spec=SPEC)
    tokens = np.stack([entry("a")[0], entry("b")[0]])
    tokens[1, 3, 4] = bad
    with pytest.raises(ValueError, match="'b'.*NaN or Inf"):
        c.add(["a", "b"], tokens, _unit(np.random.default_rng(0), 2))
    assert len(c) == 0 and not (tmp_path / "c").exists()


def test_validation_messages_nothing_written(tmp_path: Path) -> None:
    c = ImageCollection(tmp_path / "c", spec=SPEC)
    add(c, ["first"])
    x, emb = np.zeros((2, Q, D), np.float16), _unit(np.random.default_rng(0), 2)
    cases = [
        ((["a", "b"], x[:1], emb), ValueError, r"tokens must be \[2, 4, 8\]"),
        ((["a"], np.zeros((1, Q, D + 1), np.float16), emb[:1]), ValueError, r"\[1, 4, 8\]"),
        ((["a"], np.zeros((1, Q, D), np.int32), emb[:1]), ValueError, "float array"),
        ((["a"], x[:1], emb[:1, :3]), ValueError, r"embeddings must be \[1, 16\]"),
        ((["a"], x[:1], emb[:1] * np.nan), ValueError, "embeddings hold NaN"),
        (([""], x[:1], emb[:1]), ValueError, "non-empty"),
        (([3], x[:1], emb[:1]), ValueError, "must be str"),
        (("a", x[:1], emb[:1]), TypeError, "single string"),
        ((["a"], np.full((1, Q, D), 1e6, np.float32), emb[:1]), ValueError, "float16 range"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            c.add(*args)
    with pytest.raises(ValueError, match="metadata column 'path' has 1 values for 2 ids"):
        c.add(["a", "b"], x, emb, {"path": ["x"]})
    with pytest.raises(ValueError, match="'tokens' is reserved"):
        c.add(["a"], x[:1], emb[:1], {"tokens": ["x"]})
    assert c.ids() == ["first"] and c.version == ImageCollection(tmp_path / "c").version
    c.add([], x[:0], emb[:0])  # an empty batch is a no-op
    assert len(c) == 1


def test_duplicate_ids_refused_nothing_written(tmp_path: Path) -> None:
    c = ImageCollection(tmp_path / "c")
    add(c, ["a", "b"])
    version = c.version
    with pytest.raises(DuplicateIdError, match="'b' is already in the collection"):
        add(c, ["c", "b"])
    with pytest.raises(DuplicateIdError, match="'c' appears more than once"):
        add(c, ["c", "d", "c"])
    assert c.ids() == ["a", "b"] and c.version == version
    np.testing.assert_array_equal(c.get(["b"]), entry("b")[0][None])


def test_int8_tokens_size_and_accuracy(tmp_path: Path) -> None:
    q, d = 64, 384
    rng = np.random.default_rng(1)
    # Per-token magnitudes vary a lot: per-token scales keep small tokens accurate.
    x = rng.standard_normal((5, q, d)) * rng.uniform(0.01, 30.0, size=(5, q, 1))
    x[2, 7] = 0.0  # an all-zero token (scale 0) comes back as zeros
    spec = CollectionSpec(q, d, E, token_dtype="int8")
    c = ImageCollection(tmp_path / "c", spec=spec)
    c.add([f"k{i}" for i in range(5)], x.astype(np.float32), _unit(rng, 5))
    assert spec.bytes_per_image == q * d + 4 * q + 4 * E
    got = ImageCollection(tmp_path / "c", readonly=True).tokens(np.arange(5))
    assert got.dtype == np.float16 and got.shape == (5, q, d)
    np.testing.assert_array_equal(got[2, 7], 0)
    g = got.astype(np.float64)
    rel = np.linalg.norm(g - x, axis=2) / np.maximum(np.linalg.norm(x, axis=2), 1e-12)
    assert rel.max() < 0.01
    step = np.abs(x).max(axis=2, keepdims=True) / 127
    assert np.all(np.abs(g - x) <= 0.5 * step + 1e-3 * np.abs(x) + 1e-6)


# ------------------------------------------------------------------ readers and versions


def test_reader_sees_its_version_until_refresh(tmp_path: Path) -> None:
    writer = ImageCollection(tmp_path / "c")
    add(writer, ["a"])
    reader = ImageCollection(tmp_path / "c", readonly=True)
    add(writer, ["b", "c"])
    assert len(reader) == 1 and reader.ids() == ["a"]
    assert reader.refresh() == 2 and reader.ids() == ["a", "b", "c"]
    with pytest.raises(CollectionError, match="readonly"):
        add(reader, ["d"])


def test_optimize_keeps_rows_ids_and_order(tmp_path: Path) -> None:
    c = ImageCollection(tmp_path / "c")
    keys = [f"i{n}" for n in range(40)]
    for s in range(0, 40, 4):
        add(c, keys[s : s + 4])
    assert c.info()["fragments"] == 10
    report = c.optimize()
    assert report["compacted_fragments"] == 10 and report["index"] == "none"
    fresh = ImageCollection(tmp_path / "c", readonly=True)
    assert fresh.ids() == keys and fresh.info()["fragments"] == 1
    assert fresh.info()["versions"] == 1
    np.testing.assert_array_equal(fresh.rows_of(["i39", "i0"]), [39, 0])
    np.testing.assert_array_equal(fresh.tokens([17]), entry("i17")[0][None])
    add(ImageCollection(tmp_path / "c"), ["after"])  # still appendable, still unique
    with pytest.raises(DuplicateIdError):
        add(ImageCollection(tmp_path / "c"), ["i5"])


# ------------------------------------------------------------------ bad collections


def test_mismatched_spec_is_named(tmp_path: Path) -> None:
    add(ImageCollection(tmp_path / "c", spec=SPEC), ["a"])
    cases = [
        (CollectionSpec(Q, D, 32, model_id="sha256:test"), "embedding_dim 16 != 32"),
        (CollectionSpec(8, D, E), "num_tokens 4 != 8"),
        (CollectionSpec(Q, 9, E), "token_width 8 != 9"),
        (CollectionSpec(Q, D, E, model_id="sha256:other"), "model 'sha256:test' != 'sha256:other'"),
    ]
    for spec, message in cases:
        with pytest.raises(CollectionMismatchError, match=message):
            ImageCollection(tmp_path / "c", spec=spec)
    # An unknown model on either side is not a mismatch.
    assert len(ImageCollection(tmp_path / "c", spec=CollectionSpec(Q, D, E))) == 1


def test_not_a_collection_is_refused_untouched(tmp_path: Path) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    with pytest.raises(CollectionError, match="not a collection"):
        ImageCollection(other)
    assert sorted(p.name for p in other.iterdir()) == ["a.jpg"]
    lance.write_dataset(pa.table({"x": [1, 2]}), str(tmp_path / "foreign"))
    with pytest.raises(CollectionMismatchError, match="not an EDJE collection.*columns: x"):
        ImageCollection(tmp_path / "foreign")
    legacy = tmp_path / "legacy"
    (legacy / "tokens").mkdir(parents=True)
    (legacy / "tokens" / "meta.json").write_text("{}")
    with pytest.raises(CollectionMismatchError, match="edje collection migrate"):
        ImageCollection(legacy)
    with pytest.raises(CollectionError, match="no collection at"):
        ImageCollection(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing").exists()


def test_unreachable_object_store_is_named(tmp_path: Path) -> None:
    options = {
        "endpoint": "http://127.0.0.1:9",
        "region": "us-east-1",
        "access_key_id": "x",
        "secret_access_key": "y",
        "allow_http": "true",
        "timeout": "2s",
        "connect_timeout": "1s",
    }
    uri = "s3://edje-test-bucket/collection"
    with pytest.raises(CollectionError, match="s3://edje-test-bucket/collection"):
        c = ImageCollection(uri, storage_options=options)
        add(c, ["a"])


# ------------------------------------------------------------------ first stage


def test_exact_search_equals_brute_force(tmp_path: Path) -> None:
    c = ImageCollection(tmp_path / "c")
    add(c, [f"img{i}" for i in range(300)])
    queries = _unit(np.random.default_rng(1), 20)
    scores, rows = c.search(queries, 10)
    full = queries @ c.embeddings().T
    np.testing.assert_array_equal(rows, np.argsort(-full, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :10], rtol=1e-5)
    # New rows are picked up by the cached embeddings.
    add(c, ["late"])
    _, rows = c.search(entry("late")[1][None], 1)
    assert c.ids(rows[0]) == ["late"]


def test_indexed_search_recall_against_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    c = ImageCollection(tmp_path / "c", exact_limit=1000)
    centres = _unit(rng, 50)
    data = centres[rng.integers(0, 50, 4000)] + 0.3 * rng.standard_normal((4000, E))
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    c.add([f"i{n}" for n in range(4000)], np.zeros((4000, Q, D), np.float16), data)
    assert c.first_stage.maintain_index() == "build"
    assert c.first_stage.maintain_index() == "current"
    queries = _unit(rng, 50)
    _, rows = c.search(queries, 10)
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact, strict=True)])
    assert recall >= 0.9, recall
    # Rows appended after the index are found (Lance searches unindexed rows exactly).
    c.add(["fresh"], np.zeros((1, Q, D), np.float16), queries[:1])
    _, rows = c.search(queries[:1], 1)
    assert c.ids(rows[0]) == ["fresh"]


def test_index_policy() -> None:
    assert index_action(10, None, 100) == "none"
    assert index_action(101, None, 100) == "build"
    assert index_action(1000, 950, 100) == "current"
    assert index_action(1000, 800, 100) == "refresh"


def test_k_larger_than_collection_and_empty_collection(tmp_path: Path) -> None:
    c = ImageCollection(tmp_path / "c")
    with pytest.raises(LookupError, match="empty"):
        c.search(_unit(np.random.default_rng(0), 1), 5)
    add(c, ["a", "b", "c"])
    _, rows = c.search(_unit(np.random.default_rng(0), 2), 50)
    assert rows.shape == (2, 3) and sorted(rows[0]) == [0, 1, 2]
    with pytest.raises(ValueError, match="query width 5"):
        c.search(np.zeros((1, 5), np.float32), 1)
