"""Append-only on-disk store of compressed image tokens, keyed by string ids.

A :class:`TokenStore` keeps one ``[Q, D]`` block of "compressed image tokens" per id. It needs
only numpy and the standard library (no torch), so the client can read it anywhere.

On-disk format (format version 1)
---------------------------------
A store is a directory holding four files:

``meta.json``
    ``{"format": "edje-token-store", "version": 1, "dtype": "float16" | "int8",
    "num_tokens": Q | null, "width": D | null}``. Replaced atomically (temp file, fsync,
    ``os.replace``, fsync of the directory). ``Q``/``D`` are null until the first ``put``
    fixes the shape.

``tokens.bin``
    Fixed-size entries, densely packed in commit order; entry ``r`` (the "row") starts at byte
    ``r * bytes_per_entry``. No header.

    * ``float16``: ``Q*D`` little-endian fp16 values, i.e. ``Q*D*2`` bytes (49,152 bytes at
      64x384).
    * ``int8``: ``Q*D`` int8 values followed by ``Q`` little-endian float32 scales, i.e.
      ``Q*D + 4*Q`` bytes. Quantisation is symmetric per token (per row of ``D`` values):
      ``scale = max|x| / 127`` and ``q = round(x / scale)``; :meth:`TokenStore.get`
      returns ``(q * scale)`` as float16.

``index.log``
    One line per committed batch: ``"<crc32 as 8 hex digits> <json>\\n"`` where the JSON is
    ``{"first": first_row, "ids": [...], "data_crc": crc32_of_the_batch_bytes}`` and the CRC
    covers the JSON bytes. The batch occupies rows ``first .. first + len(ids) - 1``.

``lock``
    An empty file; a writer holds ``fcntl.flock(LOCK_EX)`` on it for its whole lifetime.

Commit protocol and crash safety
--------------------------------
``put`` validates the whole batch first, then (1) writes the batch's bytes at the end of the
committed data in ``tokens.bin`` and fsyncs it, then (2) appends one index line and fsyncs it.
The index line is the commit point: only rows named in ``index.log`` exist. When a writer opens
the store it replays ``index.log``, drops a torn or corrupt trailing line (a batch interrupted
during step 2), and truncates ``tokens.bin`` to ``rows * bytes_per_entry`` (bytes of a batch
interrupted during step 1). So a process killed at any point of ``put`` leaves every earlier
commit intact and the interrupted batch either fully present or fully absent. A corrupt line
*followed by* valid ones, or a data file shorter than the index claims, is not a crash artefact
and raises :class:`StoreCorruptError` instead of silently dropping data.

Only one writer may open a store at a time (a second gets :class:`StoreLockedError`).
Any number of ``readonly=True`` readers may open it alongside the writer; they take no lock,
repair nothing, see the commits that existed when they opened, and pick up later ones with
:meth:`TokenStore.refresh`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TokenStore", "StoreCorruptError", "StoreLockedError", "FORMAT_VERSION"]

FORMAT_NAME = "edje-token-store"
FORMAT_VERSION = 1
DTYPES = ("float16", "int8")

META_FILE = "meta.json"
DATA_FILE = "tokens.bin"
INDEX_FILE = "index.log"
LOCK_FILE = "lock"

_FP16_MAX = float(np.finfo(np.float16).max)


class StoreCorruptError(RuntimeError):
    """The store's files contradict each other in a way a crash cannot explain."""


class StoreLockedError(RuntimeError):
    """Another writer (in this or another process) holds the store's lock."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _encode_record(first: int, ids: Sequence[str], data_crc: int) -> bytes:
    body = json.dumps({"first": first, "ids": list(ids), "data_crc": data_crc}).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def _decode_record(line: bytes) -> dict[str, Any] | None:
    """Parse one index line (without its newline); ``None`` if torn or corrupt."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    body = line[9:]
    if zlib.crc32(body) != crc:
        return None
    try:
        rec = json.loads(body)
    except ValueError:
        return None
    if (
        not isinstance(rec, dict)
        or not isinstance(rec.get("first"), int)
        or not isinstance(rec.get("ids"), list)
        or not isinstance(rec.get("data_crc"), int)
        or not all(isinstance(i, str) for i in rec["ids"])
    ):
        return None
    return rec


class TokenStore:
    """Append-only, crash-safe store of ``[Q, D]`` token blocks keyed by string ids.

    Parameters
    ----------
    path
        Store directory (created when ``create`` is true and it does not exist).
    num_tokens, width
        ``Q`` and ``D`` of every entry. Optional: if omitted, the first :meth:`put` fixes them.
        When opening an existing store they must match what it holds.
    dtype
        ``"float16"`` (exact, ``Q*D*2`` bytes per entry) or ``"int8"`` (per-token symmetric
        quantisation, ``Q*D + 4*Q`` bytes per entry). ``None`` means "whatever the existing
        store uses", or ``"float16"`` for a new store.
    create
        Create the store if ``path`` holds none; otherwise raise ``FileNotFoundError``.
    readonly
        Open without the writer lock: no :meth:`put`, no repair of a torn tail.

    Notes
    -----
    Rows are dense ``0..len-1`` in commit order and never change, so they can serve as
    integer ids (:meth:`index_of`, :meth:`get_rows`).

    Duplicate ids: ids are unique and immutable. A :meth:`put` whose batch contains an id
    already in the store, or the same id twice, raises ``ValueError`` naming the id and
    writes nothing.

    A ``TokenStore`` object is not thread-safe; share it between threads only with a lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_tokens: int | None = None,
        width: int | None = None,
        dtype: str | None = None,
        create: bool = True,
        readonly: bool = False,
    ) -> None:
        self._path = Path(path)
        self._readonly = readonly
        self._closed = False
        self._broken: str | None = None
        self._lock_f: Any = None
        self._data_f: Any = None
        self._index_f: Any = None
        self._mm: np.ndarray | None = None
        self._mm_rows = 0
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._batches: list[tuple[int, int, int]] = []  # (first, count, data_crc)
        self._index_end = 0  # bytes of index.log consumed by replay
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        for name, v in (("num_tokens", num_tokens), ("width", width)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if (num_tokens is None) != (width is None):
            raise ValueError("give both num_tokens and width, or neither")

        try:
            self._open(num_tokens, width, dtype, create)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening

    def _open(self, q: int | None, d: int | None, dtype: str | None, create: bool) -> None:
        meta_path = self._path / META_FILE
        if not meta_path.exists() and (self._readonly or not create):
            raise FileNotFoundError(f"no token store at {self._path} ({META_FILE} missing)")
        if not self._readonly:
            if not self._path.is_dir():
                self._path.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self._path.parent)
            self._lock_f = open(self._path / LOCK_FILE, "a+b")  # noqa: SIM115
            try:
                fcntl.flock(self._lock_f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreLockedError(
                    f"token store {self._path} is already open for writing by another "
                    "TokenStore (this or another process); open it with readonly=True "
                    "or close the other writer"
                ) from None

        if meta_path.exists():
            meta = self._load_meta(meta_path)
            self._dtype = meta["dtype"]
            self._q = meta["num_tokens"]
            self._d = meta["width"]
            if dtype is not None and dtype != self._dtype:
                raise ValueError(
                    f"store {self._path} holds dtype {self._dtype!r}, but dtype={dtype!r} "
                    "was requested"
                )
            if q is not None and self._q is not None and (q, d) != (self._q, self._d):
                raise ValueError(
                    f"store {self._path} holds entries of shape {(self._q, self._d)}, but "
                    f"num_tokens={q}, width={d} was requested"
                )
            if q is not None and self._q is None and not self._readonly:
                self._q, self._d = q, d
                self._write_meta()
        else:
            self._dtype = dtype or "float16"
            self._q, self._d = q, d
            self._write_meta()

        if not self._readonly:
            created = False
            for name in (DATA_FILE, INDEX_FILE):
                p = self._path / name
                if not p.exists():
                    p.touch()
                    created = True
            if created:
                _fsync_dir(self._path)
            self._data_f = open(self._path / DATA_FILE, "r+b")  # noqa: SIM115
            self._index_f = open(self._path / INDEX_FILE, "r+b")  # noqa: SIM115
        self._replay(repair=not self._readonly)

    def _load_meta(self, meta_path: Path) -> dict[str, Any]:
        try:
            meta = json.loads(meta_path.read_bytes())
        except ValueError as e:
            raise StoreCorruptError(f"{meta_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise StoreCorruptError(f"{meta_path} does not describe an {FORMAT_NAME}")
        if meta.get("version") != FORMAT_VERSION:
            raise StoreCorruptError(
                f"{meta_path} has format version {meta.get('version')!r}; this code reads "
                f"version {FORMAT_VERSION}"
            )
        q, d = meta.get("num_tokens"), meta.get("width")
        if meta.get("dtype") not in DTYPES or not (
            (q is None and d is None)
            or (isinstance(q, int) and isinstance(d, int) and q > 0 and d > 0)
        ):
            raise StoreCorruptError(f"{meta_path} has invalid dtype or shape: {meta}")
        return meta

    def _write_meta(self) -> None:
        _write_json_atomic(
            self._path / META_FILE,
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "dtype": self._dtype,
                "num_tokens": self._q,
                "width": self._d,
            },
        )

    def _replay(self, repair: bool) -> None:
        """Apply index records past ``self._index_end``; optionally cut torn tails."""
        index_path = self._path / INDEX_FILE
        try:
            with open(index_path, "rb") as f:
                f.seek(self._index_end)
                blob = f.read()
        except FileNotFoundError:
            blob = b""
        pos = 0
        bad_at: int | None = None
        while pos < len(blob):
            nl = blob.find(b"\n", pos)
            if nl < 0:
                break  # torn final line: the batch never committed
            rec = _decode_record(blob[pos:nl])
            if rec is None:
                bad_at = pos
                break
            self._apply_record(rec, self._index_end + pos)
            pos = nl + 1
        if bad_at is not None:
            # A corrupt line is a crash artefact only if nothing valid follows it.
            for line in blob[bad_at:].split(b"\n")[1:]:
                if _decode_record(line) is not None:
                    raise StoreCorruptError(
                        f"{index_path}: corrupt record at byte {self._index_end + bad_at} "
                        "is followed by valid records"
                    )
        self._index_end += pos

        committed = len(self._ids) * (self.bytes_per_entry or 0)
        data_path = self._path / DATA_FILE
        size = data_path.stat().st_size if data_path.exists() else 0
        if size < committed:
            raise StoreCorruptError(
                f"{data_path} holds {size} bytes but {INDEX_FILE} commits {len(self._ids)} "
                f"rows ({committed} bytes)"
            )
        if repair:
            if len(blob) > pos:
                self._index_f.truncate(self._index_end)
                os.fsync(self._index_f.fileno())
            if size > committed:
                self._data_f.truncate(committed)
                os.fsync(self._data_f.fileno())

    def _apply_record(self, rec: dict[str, Any], offset: int) -> None:
        where = f"{self._path / INDEX_FILE} record at byte {offset}"
        if self._q is None:
            raise StoreCorruptError(f"{where}: rows committed but {META_FILE} has no shape")
        if rec["first"] != len(self._ids):
            raise StoreCorruptError(
                f"{where}: starts at row {rec['first']}, expected {len(self._ids)}"
            )
        first = len(self._ids)
        for k, i in enumerate(rec["ids"]):
            if i in self._row_of:
                raise StoreCorruptError(f"{where}: id {i!r} committed twice")
            self._row_of[i] = first + k
            self._ids.append(i)
        self._batches.append((first, len(rec["ids"]), rec["data_crc"]))

    # --------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._path

    @property
    def dtype(self) -> str:
        """Storage dtype, ``"float16"`` or ``"int8"`` (reads always return float16)."""
        return self._dtype

    @property
    def num_tokens(self) -> int | None:
        """``Q``, tokens per entry (``None`` until fixed)."""
        return self._q

    @property
    def width(self) -> int | None:
        """``D``, values per token (``None`` until fixed)."""
        return self._d

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(Q, D)`` of every entry, or ``None`` until the first put fixes it."""
        return None if self._q is None else (self._q, self._d)

    @property
    def readonly(self) -> bool:
        """Whether this object was opened with ``readonly=True``."""
        return self._readonly

    @property
    def bytes_per_entry(self) -> int | None:
        """Bytes one entry takes in ``tokens.bin`` (``None`` until the shape is fixed).

        ``Q*D*2`` for float16, ``Q*D + 4*Q`` for int8.
        """
        if self._q is None:
            return None
        return self._entry_dtype().itemsize

    def _entry_dtype(self) -> np.dtype:
        q, d = self._q, self._d
        if self._dtype == "float16":
            return np.dtype(("<f2", (q, d)))
        return np.dtype([("q", "i1", (q, d)), ("scale", "<f4", (q,))])

    # -------------------------------------------------------------- mapping API

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    def __contains__(self, key: object) -> bool:
        return key in self._row_of

    def ids(self) -> list[str]:
        """All ids in insertion (row) order."""
        return list(self._ids)

    def ids_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The ids of the given rows."""
        return [self._ids[int(r)] for r in rows]

    def index_of(self, key: str) -> int:
        """Row number of ``key`` (dense, in commit order); ``KeyError`` if unknown."""
        try:
            return self._row_of[key]
        except KeyError:
            raise KeyError(f"unknown id {key!r}") from None

    # -------------------------------------------------------------------- write

    def put(self, ids: Sequence[str], tokens: np.ndarray) -> None:
        """Append a batch as one atomic commit.

        Parameters
        ----------
        ids
            ``N`` new, distinct, non-empty string ids without newlines.
        tokens
            Finite float array ``[N, Q, D]`` (values within float16 range).

        Raises
        ------
        ValueError
            Bad ids or tokens, an id already stored or repeated, or a shape other than the
            store's. Nothing is written in that case.
        """
        self._check_open()
        if self._readonly:
            raise PermissionError(f"token store {self._path} was opened readonly")
        if self._broken:
            raise StoreCorruptError(f"token store {self._path} is unusable: {self._broken}")
        ids = self._check_ids(ids)
        tokens = np.asarray(tokens)
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be a 3-D array [N, Q, D], got shape {tokens.shape}")
        if tokens.dtype.kind != "f":
            raise ValueError(f"tokens must be a float array, got dtype {tokens.dtype}")
        if tokens.shape[0] != len(ids):
            raise ValueError(
                f"got {len(ids)} ids but tokens has {tokens.shape[0]} entries "
                f"(shape {tokens.shape})"
            )
        shape = (int(tokens.shape[1]), int(tokens.shape[2]))
        if self._q is not None and shape != (self._q, self._d):
            raise ValueError(
                f"tokens have entry shape {shape} but this store holds entries of shape "
                f"{(self._q, self._d)}"
            )
        if 0 in shape:
            raise ValueError(f"entry shape must be non-empty, got {shape}")
        if not np.isfinite(tokens).all():
            bad = int(np.argmax(~np.isfinite(tokens).reshape(len(ids), -1).all(axis=1)))
            raise ValueError(f"tokens for id {ids[bad]!r} contain NaN or Inf")
        if tokens.dtype.itemsize > 2 and np.abs(tokens).max(initial=0.0) > _FP16_MAX:
            raise ValueError(f"tokens exceed the float16 range (|x| > {_FP16_MAX})")
        if not ids:
            return

        if self._q is None:
            self._q, self._d = shape
            self._write_meta()
        payload = self._encode(tokens)
        self._commit(ids, memoryview(payload.reshape(-1).view(np.uint8)))

    def _check_ids(self, ids: Sequence[str]) -> list[str]:
        if isinstance(ids, (str, bytes)):
            raise TypeError("ids must be a sequence of str, not a single string")
        seen: set[str] = set()
        out: list[str] = []
        for i in ids:
            if not isinstance(i, str):
                raise ValueError(f"ids must be str, got {type(i).__name__}: {i!r}")
            if not i:
                raise ValueError("ids must be non-empty strings")
            if "\n" in i or "\r" in i:
                raise ValueError(f"id {i!r} contains a newline")
            if i in self._row_of:
                raise ValueError(f"id {i!r} is already in the store (ids are immutable)")
            if i in seen:
                raise ValueError(f"id {i!r} appears more than once in this batch")
            seen.add(i)
            out.append(str(i))
        return out

    def _encode(self, tokens: np.ndarray) -> np.ndarray:
        if self._dtype == "float16":
            return np.ascontiguousarray(tokens, dtype="<f2")
        x = tokens.astype(np.float32)
        scale = np.abs(x).max(axis=2) / 127.0  # [N, Q]
        safe = np.where(scale > 0, scale, 1.0)[..., None]
        out = np.empty(len(x), dtype=self._entry_dtype())
        out["q"] = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
        out["scale"] = scale
        return out

    def _commit(self, ids: list[str], payload: memoryview) -> None:
        first = len(self._ids)
        data_off = first * self.bytes_per_entry
        index_off = self._index_end
        data_crc = zlib.crc32(payload)
        record = _encode_record(first, ids, data_crc)
        try:
            _pwrite_all(self._data_f.fileno(), payload, data_off)
            os.fsync(self._data_f.fileno())
            _pwrite_all(self._index_f.fileno(), memoryview(record), index_off)
            os.fsync(self._index_f.fileno())
        except BaseException as e:
            # Undo so the files stay consistent with what this object believes.
            try:
                self._index_f.truncate(index_off)
                os.fsync(self._index_f.fileno())
                self._data_f.truncate(data_off)
                os.fsync(self._data_f.fileno())
            except BaseException as e2:
                self._broken = f"rollback after a failed put failed: {e2!r} (put: {e!r})"
            raise
        self._index_end += len(record)
        for k, i in enumerate(ids):
            self._row_of[i] = first + k
        self._ids.extend(ids)
        self._batches.append((first, len(ids), data_crc))

    # --------------------------------------------------------------------- read

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """Tokens of ``ids`` as a new float16 array ``[N, Q, D]``.

        Raises ``KeyError`` naming the first unknown id.
        """
        if isinstance(ids, (str, bytes)):
            raise TypeError("ids must be a sequence of str, not a single string")
        self._check_open()
        rows = np.empty(len(ids), dtype=np.int64)
        for k, i in enumerate(ids):
            try:
                rows[k] = self._row_of[i]
            except KeyError:
                raise KeyError(f"unknown id {i!r}") from None
        return self._read(rows)

    def get_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Tokens of row numbers ``rows`` as a new float16 array ``[N, Q, D]``.

        Raises ``IndexError`` for a row outside ``0 .. len-1``.
        """
        self._check_open()
        r = np.asarray(rows)
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise ValueError(f"rows must be a 1-D integer array, got {r.dtype} {r.shape}")
        r = r.astype(np.int64, copy=False)
        if r.size and (r.min() < 0 or r.max() >= len(self._ids)):
            bad = r[(r < 0) | (r >= len(self._ids))][0]
            raise IndexError(f"row {int(bad)} out of range for a store of {len(self)} rows")
        return self._read(r)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        if self._q is None:
            return np.zeros((len(rows), 0, 0), dtype=np.float16)
        if len(rows) == 0:
            return np.zeros((0, self._q, self._d), dtype=np.float16)
        mm = self._map()
        if self._dtype == "float16":
            return np.array(mm[rows], dtype=np.float16)
        sel = mm[rows]
        return (sel["q"].astype(np.float32) * sel["scale"][..., None]).astype(np.float16)

    def _map(self) -> np.ndarray:
        n = len(self._ids)
        if self._mm is None or self._mm_rows != n:
            self._mm = np.memmap(
                self._path / DATA_FILE, dtype=self._entry_dtype(), mode="r", shape=(n,)
            )
            self._mm_rows = n
        return self._mm

    # ---------------------------------------------------------------- upkeep

    def refresh(self) -> int:
        """Pick up batches committed since this object last looked; return how many rows.

        Useful for ``readonly`` readers of a store another object writes. A writer already
        knows all commits, so for it this returns 0.
        """
        self._check_open()
        before = len(self._ids)
        if self._q is None:
            meta = self._load_meta(self._path / META_FILE)
            self._q, self._d = meta["num_tokens"], meta["width"]
        self._replay(repair=False)
        return len(self._ids) - before

    def verify(self) -> None:
        """Re-read all committed data and check each batch's CRC.

        Raises :class:`StoreCorruptError` on the first mismatch. Reads the whole data file.
        """
        self._check_open()
        if not self._ids:
            return
        raw = self._map().view(np.uint8).reshape(-1)
        bpe = self.bytes_per_entry
        for first, count, crc in self._batches:
            got = zlib.crc32(raw[first * bpe : (first + count) * bpe])
            if got != crc:
                raise StoreCorruptError(
                    f"{self._path / DATA_FILE}: rows {first}..{first + count - 1} fail "
                    f"their checksum ({got:08x} != {crc:08x})"
                )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"token store {self._path} is closed")

    def close(self) -> None:
        """Release the files and the writer lock. Idempotent."""
        self._closed = True
        self._mm = None
        for f in (self._data_f, self._index_f, self._lock_f):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._data_f = self._index_f = self._lock_f = None

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("readonly" if self._readonly else "writable")
        return (
            f"TokenStore({str(self._path)!r}, shape={self.shape}, dtype={self._dtype!r}, "
            f"len={len(self)}, {state})"
        )
