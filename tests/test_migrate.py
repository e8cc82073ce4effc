"""Migration of format-1 collections (token store + embeddings.f32) into Lance collections.

The format-1 writer here is written from the format's documentation, independently of the
old ``store.py`` (which is going away): ``tokens/meta.json``, ``tokens/tokens.bin`` (fixed-size
entries in row order), ``tokens/index.log`` (``"<crc32 8 hex> <json>\\n"`` per batch),
``embeddings.f32`` and ``embeddings.json``.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from edje_client.collection import CollectionError, ImageCollection
from edje_client.collection_format import quantise_int8
from edje_client.legacy_store import LegacyCollection, migrate

Q, D, E = 4, 8, 16
BATCHES = (7, 1, 16, 10, 16)  # 50 rows over 5 commits


def _index_line(first: int, ids: list[str], data: bytes) -> bytes:
    body = json.dumps({"first": first, "ids": ids, "data_crc": zlib.crc32(data)}).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def write_format1(path: Path, dtype: str, batches=BATCHES, seed: int = 0) -> dict:
    """A format-1 collection of ``sum(batches)`` rows, plus the leftovers of a crashed batch.

    Returns what a reader must see: ids, float16 tokens (dequantised for int8), int8 ``q`` and
    scales, embeddings, and the byte offset of each index line.
    """
    rng = np.random.default_rng(seed)
    n = sum(batches)
    ids = [f"img-{seed}-{k:03d}" for k in range(n)]
    x = rng.standard_normal((n, Q, D)).astype(np.float32) * 3  # the model's float32 output
    x[3, 1] = 0.0  # an all-zero token: scale 0
    emb = rng.standard_normal((n, E)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    if dtype == "float16":
        tokens = x.astype("<f2")
        entries = [tokens[r].tobytes() for r in range(n)]
        q = scale = None
    else:  # per-token symmetric int8: scale = max|x| / 127, q = round(x / scale)
        scale = (np.abs(x).max(axis=2) / 127.0).astype("<f4")
        q = np.clip(np.rint(x / np.where(scale > 0, scale, 1)[..., None]), -127, 127)
        q = q.astype(np.int8)
        entries = [q[r].tobytes() + scale[r].tobytes() for r in range(n)]
        tokens = (q.astype(np.float32) * scale[..., None]).astype(np.float16)
    store = path / "tokens"
    store.mkdir(parents=True)
    meta = {"format": "edje-token-store", "version": 1, "dtype": dtype}
    (store / "meta.json").write_text(json.dumps({**meta, "num_tokens": Q, "width": D}))
    (store / "lock").touch()
    log, offsets, first = b"", [], 0
    for size in batches:
        offsets.append(len(log))
        log += _index_line(first, ids[first : first + size], b"".join(entries[first:][:size]))
        first += size
    # A batch that crashed mid-commit: its data and embeddings written, its index line torn.
    torn = _index_line(n, ["crashed-1", "crashed-2"], entries[0] * 2)[:-7]
    (store / "index.log").write_bytes(log + torn)
    (store / "tokens.bin").write_bytes(b"".join(entries) + entries[0] * 2)
    (path / "embeddings.f32").write_bytes(np.concatenate([emb, emb[:2]]).tobytes())
    (path / "embeddings.json").write_text(json.dumps({"dim": E}))
    (path / "ann.faiss").write_bytes(b"a derived cache: never read")
    return {"ids": ids, "tokens": tokens, "q": q, "scale": scale, "emb": emb, "offsets": offsets}


def _expected(old: dict, token_dtype: str) -> dict:
    """What a ``token_dtype`` collection migrated from ``old`` must hold."""
    if token_dtype == "float16" or old["q"] is not None:
        return old
    q, scale = quantise_int8(old["tokens"])  # float16 into int8: the collection quantises
    tokens = (q.astype(np.float32) * scale[..., None]).astype(np.float16)
    return {**old, "q": q, "scale": scale, "tokens": tokens}


def assert_rows(path: Path, want: dict, token_dtype: str) -> None:
    """The collection at ``path`` holds exactly ``want``'s rows, in order, bit for bit."""
    c = ImageCollection(path, readonly=True)
    n = len(want["ids"])
    assert len(c) == n and c.ids() == want["ids"]
    assert (c.spec.num_tokens, c.spec.token_width, c.spec.embedding_dim) == (Q, D, E)
    assert c.spec.token_dtype == token_dtype
    np.testing.assert_array_equal(c.embeddings().view(np.uint32), want["emb"].view(np.uint32))
    got = c.tokens(np.arange(n))
    np.testing.assert_array_equal(got.view(np.uint16), want["tokens"].view(np.uint16))
    if token_dtype == "int8":
        table = c.dataset.to_table(columns=["tokens", "token_scales"])
        q = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(n, Q, D)
        scale = table.column("token_scales").combine_chunks().flatten().to_numpy().reshape(n, Q)
        np.testing.assert_array_equal(q, want["q"])
        np.testing.assert_array_equal(scale.view(np.uint32), want["scale"].view(np.uint32))
    assert c.rows_of([want["ids"][-1], want["ids"][0]]).tolist() == [n - 1, 0]


@pytest.mark.parametrize(
    ("source_dtype", "token_dtype"),
    [("float16", None), ("int8", None), ("int8", "float16"), ("float16", "int8")],
)
def test_migrate_copies_every_row_exactly(tmp_path, source_dtype, token_dtype):
    old = write_format1(tmp_path / "old", source_dtype)
    report = migrate(
        tmp_path / "old",
        str(tmp_path / "new"),
        model_id="sha256:abc",
        token_dtype=token_dtype,
        batch_size=8,
    )
    dtype = token_dtype or source_dtype
    print(
        f"\nmigrated {report['rows']} rows {source_dtype} -> {dtype} in {report['seconds']:.3f} s"
    )
    assert report["rows"] == 50 and report["verified"] is True
    assert report["token_dtype"] == dtype and report["source_token_dtype"] == source_dtype
    assert_rows(tmp_path / "new", _expected(old, dtype), dtype)  # the crashed batch is not there
    c = ImageCollection(tmp_path / "new", readonly=True)
    assert c.spec.model_id == "sha256:abc" and c.info()["fragments"] == report["fragments"] == 1
    assert "id_idx" in c.info()["indices"]
    with ImageCollection(tmp_path / "new") as w:  # a migrated collection takes appends
        w.add(["after"], old["tokens"][:1], old["emb"][:1])
        assert w.rows_of(["after"]).tolist() == [50]


def test_requantising_the_dequantised_values_is_not_exact(tmp_path):
    """Why int8 is copied as stored: from float32 model output, ``quantise_int8`` of the
    dequantised float16 values finds the same ``q`` but other scales (and float16 values)."""
    old = write_format1(tmp_path / "old", "int8")
    q, scale = quantise_int8(old["tokens"])
    np.testing.assert_array_equal(q, old["q"])
    assert (scale != old["scale"]).mean() > 0.5
    again = (q.astype(np.float32) * scale[..., None]).astype(np.float16)
    assert (again.view(np.uint16) != old["tokens"].view(np.uint16)).any()


def test_corrupt_trailing_line_is_a_crash_artefact(tmp_path):
    old = write_format1(tmp_path / "old", "float16")
    index = tmp_path / "old" / "tokens" / "index.log"
    lines = index.read_bytes().split(b"\n")  # 5 batches, then the torn line
    lines[4] = lines[4][:20] + b"X" + lines[4][21:]  # the last batch's line: CRC fails
    index.write_bytes(b"\n".join(lines[:5]) + b"\n")
    assert len(LegacyCollection(tmp_path / "old")) == 50 - BATCHES[-1]
    report = migrate(tmp_path / "old", str(tmp_path / "new"))
    assert report["rows"] == 50 - BATCHES[-1]
    keep = 50 - BATCHES[-1]
    want = {**old, "ids": old["ids"][:keep], "tokens": old["tokens"][:keep]}
    assert_rows(tmp_path / "new", {**want, "emb": old["emb"][:keep]}, "float16")


def _corrupt_middle_line(path: Path, old: dict) -> None:
    index = path / "tokens" / "index.log"
    blob = bytearray(index.read_bytes())
    blob[old["offsets"][2] + 12] ^= 0x01  # a flipped bit in the third of five lines
    index.write_bytes(bytes(blob))


def _flip_token_byte(path: Path, old: dict) -> None:
    data = path / "tokens" / "tokens.bin"
    blob = bytearray(data.read_bytes())
    blob[30 * Q * D * 2 + 5] ^= 0x40  # inside row 30, a committed row
    data.write_bytes(bytes(blob))


def _truncate(name: str, keep: int):
    def damage(path: Path, old: dict) -> None:
        blob = (path / name).read_bytes()
        (path / name).write_bytes(blob[:keep])

    return damage


DAMAGE = {
    "corrupt middle index line": (_corrupt_middle_line, "index.log", "corrupt record"),
    "tokens.bin checksum": (_flip_token_byte, "tokens.bin", "checksum"),
    "missing embeddings.f32": (
        lambda path, old: (path / "embeddings.f32").unlink(),
        "embeddings.f32",
        "missing",
    ),
    "short embeddings.f32": (_truncate("embeddings.f32", 49 * E * 4), "embeddings.f32", "bytes"),
    "short tokens.bin": (_truncate("tokens/tokens.bin", 100), "tokens.bin", "bytes"),
    "missing embeddings.json": (
        lambda path, old: (path / "embeddings.json").unlink(),
        "embeddings.json",
        "missing",
    ),
    "not format 1": (
        lambda path, old: (path / "tokens" / "meta.json").write_text("{}"),
        "meta.json",
        "version",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_source_is_a_clear_error_and_writes_nothing(tmp_path, damage):
    do, file, problem = DAMAGE[damage]
    old = write_format1(tmp_path / "old", "float16")
    do(tmp_path / "old", old)
    with pytest.raises(CollectionError, match=problem) as err:
        migrate(tmp_path / "old", str(tmp_path / "new"))
    assert file in str(err.value), err.value
    print(f"\n{damage}: {err.value}")
    assert not (tmp_path / "new").exists()


def test_existing_collection_is_refused_and_left_untouched(tmp_path):
    old = write_format1(tmp_path / "old", "float16")
    target = tmp_path / "target"
    with ImageCollection(target) as c:
        c.add(["kept-1", "kept-2"], old["tokens"][:2], old["emb"][:2])
        version = c.version
    files = {p: p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()}
    with pytest.raises(CollectionError, match="already holds 2 rows"):
        migrate(tmp_path / "old", str(target))
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()} == files
    c = ImageCollection(target, readonly=True)
    assert c.ids() == ["kept-1", "kept-2"] and c.version == version

    other = tmp_path / "other"  # a directory that is not a collection
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CollectionError, match="not a collection"):
        migrate(tmp_path / "old", str(other))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    with pytest.raises(CollectionError, match="format-1"):  # into itself, or another old one
        migrate(tmp_path / "old", str(tmp_path / "old"))


def test_verification_failure_names_the_first_bad_id(tmp_path, monkeypatch):
    """A copy that differs from the source (here: tampered on its way) is caught row by row."""
    import pyarrow as pa

    import edje_client.legacy_store as legacy

    write_format1(tmp_path / "old", "int8")
    real = legacy.write_fragments

    def tampering(uri, reader, storage_options=None):
        table = reader.read_all()
        for name, row in (("embedding", 23), ("token_scales", 17)):
            column = table.column(name).combine_chunks()
            values = column.flatten().to_numpy().copy()
            values[row * column.type.list_size] *= 1.0001
            changed = pa.FixedSizeListArray.from_arrays(pa.array(values), column.type.list_size)
            table = table.set_column(table.schema.get_field_index(name), name, changed)
        return real(uri, table.cast(reader.schema), storage_options)

    monkeypatch.setattr(legacy, "write_fragments", tampering)
    with pytest.raises(CollectionError, match=r"row 17 \(id 'img-0-017'\).* in token_scales"):
        migrate(tmp_path / "old", str(tmp_path / "new"))
