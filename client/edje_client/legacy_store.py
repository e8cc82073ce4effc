"""Read format-1 collections (read-only) and migrate them into a Lance collection.

Format 1: ``tokens/`` (``meta.json``, ``tokens.bin``, ``index.log``), ``embeddings.f32``
(float32 ``[rows, E]``, row ``r`` belonging to token row ``r``; rows past the committed count
are a crashed batch, ignored), ``embeddings.json`` (``{"dim": E}``), ``ann.faiss`` (a cache,
not read). ``index.log``: per committed batch ``"<crc32 of the JSON, 8 hex> <JSON>\\n"``, the
JSON ``{"first": row, "ids": [...], "data_crc": crc32 of its tokens.bin bytes}``. A torn or
corrupt *trailing* line is a crash artefact and ignored; a corrupt line before valid ones, a
short file or a failed checksum is corruption: a :class:`CollectionError` naming the file.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from edje_client.collection import (
    CollectionError,
    CollectionSpec,
    ImageCollection,
    rows_table,
    write_fragments,
)

STORE_FORMAT = "edje-token-store"
STORE_VERSION = 1
DTYPES = ("float16", "int8")


def _json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CollectionError(f"{path} is missing (not a format-1 collection?)") from None
    except ValueError as exc:
        raise CollectionError(f"{path} is not valid JSON: {exc}") from None
    return obj if isinstance(obj, dict) else {}


def _meta(path: Path) -> tuple[str, int, int]:
    """``(dtype, Q, D)`` from ``tokens/meta.json``; ``Q = D = 0`` while the shape is unset."""
    meta = _json(path)
    if (meta.get("format"), meta.get("version")) != (STORE_FORMAT, STORE_VERSION):
        raise CollectionError(f"{path} does not describe an {STORE_FORMAT} version 1: {meta}")
    q, d = meta.get("num_tokens", 0) or 0, meta.get("width", 0) or 0
    if not all(type(v) is int and v >= 0 for v in (q, d)) or (q == 0) != (d == 0):
        raise CollectionError(f"{path}: invalid shape num_tokens={q!r}, width={d!r}")
    if meta.get("dtype") not in DTYPES:
        raise CollectionError(f"{path}: dtype {meta.get('dtype')!r} is not one of {DTYPES}")
    return meta["dtype"], q, d


def _record(line: bytes) -> dict[str, Any] | None:
    """One index line (without newline) as ``{first, ids, data_crc}``; ``None`` if invalid."""
    try:
        if len(line) < 10 or line[8:9] != b" " or int(line[:8], 16) != zlib.crc32(line[9:]):
            return None
        rec = json.loads(line[9:])
    except ValueError:
        return None
    ids = rec.get("ids") if isinstance(rec, dict) else None
    ok = isinstance(ids, list) and all(isinstance(i, str) and i for i in ids)
    return rec if ok and all(type(rec.get(k)) is int for k in ("first", "data_crc")) else None


def _replay(index: Path, shaped: bool) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Committed ids and batches ``(first, rows, data_crc)`` of ``index.log``."""
    if not index.is_file():
        raise CollectionError(f"{index} is missing")
    blob, pos = index.read_bytes(), 0
    ids: list[str] = []
    batches: list[tuple[int, int, int]] = []
    while (nl := blob.find(b"\n", pos)) >= 0:  # a final line without newline is torn
        rec = _record(blob[pos:nl])
        if rec is None:
            if any(_record(line) for line in blob[pos:].split(b"\n")[1:]):
                raise CollectionError(f"{index}: corrupt record at byte {pos} before valid ones")
            break  # a corrupt trailing line: a crash artefact
        if not shaped:
            raise CollectionError(f"{index}: rows committed but meta.json has no shape")
        if rec["first"] != len(ids):
            raise CollectionError(f"{index}: record at byte {pos} starts at row {rec['first']}")
        batches.append((len(ids), len(rec["ids"]), rec["data_crc"]))
        ids += rec["ids"]
        pos = nl + 1
    if len(set(ids)) != len(ids):
        dup = next(i for i, count in Counter(ids).items() if count > 1)
        raise CollectionError(f"{index}: id {dup!r} is committed twice")
    return ids, batches


def _map(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``path`` memory-mapped as ``shape`` (longer is a crash's tail, shorter is corruption)."""
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if need == 0:
        return np.zeros(shape, dtype)
    if not path.is_file():
        raise CollectionError(f"{path} is missing")
    if path.stat().st_size < need:
        raise CollectionError(f"{path} holds {path.stat().st_size} bytes; the rows need {need}")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def _fixed(values: np.ndarray, width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


class LegacyCollection:
    """A format-1 collection, opened read-only with its checksums verified; ids in row order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        store = self.path / "tokens"
        self.dtype, q, d = _meta(store / "meta.json")
        self.num_tokens, self.token_width = q, d
        f16, i8 = ("<f2", (q, d)), [("q", "i1", (q, d)), ("scale", "<f4", (q,))]
        self.entry = np.dtype(f16 if self.dtype == "float16" else i8)
        self.ids, self.batches = _replay(store / "index.log", q > 0)
        n = len(self.ids)
        self._tokens = _map(store / "tokens.bin", self.entry, (n,))
        self.embedding_dim = _json(self.path / "embeddings.json").get("dim") if n else 0
        if n and not (type(self.embedding_dim) is int and self.embedding_dim > 0):
            raise CollectionError(f"{self.path / 'embeddings.json'}: no positive 'dim'")
        self._embeddings = _map(self.path / "embeddings.f32", np.float32, (n, self.embedding_dim))
        self.verify()

    def __len__(self) -> int:
        return len(self.ids)

    def verify(self) -> None:
        """Check every committed batch's bytes in ``tokens.bin`` against its ``data_crc``."""
        raw, size = self._tokens.reshape(-1).view(np.uint8), self.entry.itemsize
        data = self.path / "tokens" / "tokens.bin"
        for first, count, crc in self.batches:
            got = zlib.crc32(raw[first * size : (first + count) * size])
            if got != crc:
                rows = f"rows {first}..{first + count - 1} (ids {self.ids[first]!r}..)"
                raise CollectionError(f"{data}: {rows} fail their checksum {got:08x} != {crc:08x}")

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """float16 ``[n, Q, D]`` tokens of rows ``start .. stop-1`` (int8 is dequantised)."""
        sel = self._tokens[start:stop]
        if self.dtype == "float16":
            return np.array(sel, dtype=np.float16)
        return (sel["q"].astype(np.float32) * sel["scale"][..., None]).astype(np.float16)

    def embeddings(self, start: int, stop: int) -> np.ndarray:
        """float32 ``[n, E]`` embeddings of rows ``start .. stop-1``."""
        return np.array(self._embeddings[start:stop], dtype=np.float32)

    def table(self, spec: CollectionSpec, start: int, stop: int) -> pa.Table:
        """Rows ``start .. stop-1`` as an Arrow table of ``spec``'s schema."""
        ids, emb = self.ids[start:stop], self.embeddings(start, stop)
        if not spec.token_dtype == self.dtype == "int8":
            return rows_table(spec, ids, self.tokens(start, stop), emb)
        # int8 into int8: q and scales as stored (re-quantising float16 rounds scales anew)
        sel = self._tokens[start:stop]
        columns = {
            "id": pa.array(ids, pa.string()),
            "tokens": _fixed(np.ascontiguousarray(sel["q"]), self.num_tokens * self.token_width),
            "token_scales": _fixed(np.ascontiguousarray(sel["scale"]), self.num_tokens),
            "embedding": _fixed(emb, self.embedding_dim),
        }
        return pa.table(columns).cast(spec.schema())


def _bytes(column: pa.ChunkedArray, n: int) -> np.ndarray:
    """A fixed-size-list column as ``[n, bytes]`` uint8, for bit-exact comparison."""
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.view(np.uint8).reshape(n, -1)


def _check(source: LegacyCollection, dest: ImageCollection, batch_size: int, bar: Any) -> None:
    """Compare every row of ``dest`` bit for bit with ``source``; raise naming the first bad id."""
    if len(dest) != len(source):
        raise CollectionError(f"{dest.uri} holds {len(dest)} rows, {source.path} {len(source)}")
    columns, start = dest.spec.schema().names, 0
    for batch in dest.dataset.to_batches(columns=columns, batch_size=batch_size):
        batch = pa.Table.from_batches([batch])
        n, want = batch.num_rows, source.table(dest.spec, start, start + batch.num_rows)
        wrong = {"id": np.array(batch.column("id").to_pylist(), object) != want["id"].to_pylist()}
        for name in columns[1:]:
            wrong[name] = (_bytes(batch.column(name), n) != _bytes(want[name], n)).any(axis=1)
        bad = np.logical_or.reduce(list(wrong.values()))
        if bad.any():
            k = int(np.argmax(bad))
            what = ", ".join(name for name, mask in wrong.items() if mask[k])
            where = f"row {start + k} (id {source.ids[start + k]!r}) of {dest.uri}"
            raise CollectionError(f"migration check failed: {where} differs in {what}")
        bar.update(n)
        start += n


def migrate(
    old: str | Path,
    new: str,
    *,
    model_id: str = "",
    token_dtype: str | None = None,
    batch_size: int = 1024,
    storage_options: dict[str, str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Copy every committed row of the format-1 collection ``old`` into a new collection ``new``.

    The source is checked whole before anything is written; ``new`` must not exist or be empty.
    Rows stream in batches of ``batch_size`` into data files that one commit publishes (so an
    interrupted migration leaves no collection, at worst files under ``new/data``); then every
    row of ``new`` is compared with the source. Raises :class:`CollectionError` on any problem.
    """
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    t0 = time.perf_counter()
    source = LegacyCollection(old)
    n = len(source)
    if not n:
        raise CollectionError(f"{source.path} holds no committed rows: nothing to migrate")
    dims = (source.num_tokens, source.token_width, source.embedding_dim)
    spec = CollectionSpec(*dims, token_dtype or source.dtype, model_id)
    dest = ImageCollection(new, spec=spec, storage_options=storage_options)
    if len(dest):
        raise CollectionError(f"{new} already holds {len(dest)} rows: nothing was written")

    def batches(bar: Any):
        for s in range(0, n, batch_size):
            yield from source.table(spec, s, min(n, s + batch_size)).to_batches()
            bar.update(min(n, s + batch_size) - s)

    with tqdm(total=2 * n, desc="copy and check", unit="row", disable=not progress) as bar:
        reader = pa.RecordBatchReader.from_batches(spec.schema(), batches(bar))
        dest.commit_fragments(write_fragments(new, reader, storage_options), source.ids)
        written = time.perf_counter()
        check = ImageCollection(new, readonly=True, storage_options=storage_options)
        _check(source, check, batch_size, bar)
    done = time.perf_counter()
    report = {"rows": n, "seconds": done - t0, "verified": True, "collection": str(new)}
    report |= {"write_seconds": written - t0, "verify_seconds": done - written}
    report |= {"source": str(source.path), "source_token_dtype": source.dtype, **asdict(spec)}
    return report | {"fragments": len(check.dataset.get_fragments())}
