"""Tests for :mod:`edje_client.store` (TokenStore): format, validation, and crash safety."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from edje_client.store import (
    DATA_FILE,
    INDEX_FILE,
    META_FILE,
    StoreCorruptError,
    StoreLockedError,
    TokenStore,
)

Q, D = 8, 16


def tok(key: str, q: int = Q, d: int = D) -> np.ndarray:
    """Tokens derived deterministically from the id (same formula as the crash child)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return rng.standard_normal((q, d)).astype(np.float16)


def batch(keys: list[str], q: int = Q, d: int = D) -> np.ndarray:
    return np.stack([tok(k, q, d) for k in keys])


# ------------------------------------------------------------------ basics


def test_roundtrip_fp16_exact_and_size(tmp_path: Path) -> None:
    keys = [f"img{i}" for i in range(7)]
    with TokenStore(tmp_path / "s") as st:
        st.put(keys[:3], batch(keys[:3]))
        st.put(keys[3:], batch(keys[3:]))
        got = st.get(keys)
        assert got.dtype == np.float16 and got.shape == (7, Q, D)
        np.testing.assert_array_equal(got, batch(keys))
        # Reads see later commits of the same object (the map grows).
        np.testing.assert_array_equal(st.get(["img5", "img0"]), batch(["img5", "img0"]))
        assert st.bytes_per_entry == Q * D * 2
    assert (tmp_path / "s" / DATA_FILE).stat().st_size == 7 * Q * D * 2


def test_float32_input_is_cast_to_fp16(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, Q, D)).astype(np.float32)
    with TokenStore(tmp_path / "s") as st:
        st.put(["a", "b"], x)
        np.testing.assert_array_equal(st.get(["a", "b"]), x.astype(np.float16))


def test_real_size_bytes_per_entry(tmp_path: Path) -> None:
    with TokenStore(tmp_path / "s", num_tokens=64, width=384) as st:
        assert st.bytes_per_entry == 49_152
        x = np.random.default_rng(0).standard_normal((3, 64, 384)).astype(np.float16)
        st.put(["a", "b", "c"], x)
        np.testing.assert_array_equal(st.get(["c", "a"]), x[[2, 0]])
    assert (tmp_path / "s" / DATA_FILE).stat().st_size == 3 * 49_152


def test_reopen_order_and_lookup(tmp_path: Path) -> None:
    keys = ["z", "a", "m", "b", "y"]
    with TokenStore(tmp_path / "s") as st:
        st.put(keys[:2], batch(keys[:2]))
        st.put(keys[2:], batch(keys[2:]))
    with TokenStore(tmp_path / "s", create=False) as st:
        assert st.shape == (Q, D) and st.dtype == "float16"
        assert len(st) == 5
        assert list(st) == keys and st.ids() == keys
        assert "m" in st and "q" not in st and 3 not in st
        assert [st.index_of(k) for k in keys] == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(st.get(keys), batch(keys))
        np.testing.assert_array_equal(st.get_rows(np.array([4, 0, 2])), batch(["y", "z", "m"]))
        assert st.get_rows(np.array([], dtype=np.int64)).shape == (0, Q, D)
        assert st.get([]).shape == (0, Q, D)
        with pytest.raises(IndexError, match="row 5"):
            st.get_rows([5])
        with pytest.raises(IndexError, match="row -1"):
            st.get_rows([-1])
        st.put(["new"], batch(["new"]))
        assert st.index_of("new") == 5


def test_create_false_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no token store"):
        TokenStore(tmp_path / "nothing", create=False)


def test_unknown_id_keyerror(tmp_path: Path) -> None:
    with TokenStore(tmp_path / "s") as st:
        st.put(["a"], batch(["a"]))
        with pytest.raises(KeyError, match="'nope'"):
            st.get(["a", "nope", "also-nope"])
        with pytest.raises(KeyError, match="'nope'"):
            st.index_of("nope")
        with pytest.raises(TypeError, match="single string"):
            st.get("a")


def test_shape_mismatch(tmp_path: Path) -> None:
    with TokenStore(tmp_path / "s") as st:
        assert st.shape is None and st.bytes_per_entry is None
        st.put(["a"], batch(["a"]))
        with pytest.raises(ValueError, match=r"\(8, 17\).*\(8, 16\)"):
            st.put(["b"], np.zeros((1, 8, 17), np.float16))
        assert len(st) == 1
    with pytest.raises(ValueError, match=r"\(8, 16\).*num_tokens=4, width=16"):
        TokenStore(tmp_path / "s", num_tokens=4, width=16)
    with pytest.raises(ValueError, match="'float16'.*'int8'"):
        TokenStore(tmp_path / "s", dtype="int8")
    # Shape fixed by the constructor is enforced on the first put too.
    with (
        TokenStore(tmp_path / "t", num_tokens=2, width=3) as st,
        pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"),
    ):
        st.put(["a"], np.zeros((1, 2, 4), np.float16))
    with TokenStore(tmp_path / "t") as st:
        assert st.shape == (2, 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(tmp_path: Path, bad: float) -> None:
    x = batch(["a", "b"])
    x[1, 3, 4] = bad
    with TokenStore(tmp_path / "s") as st:
        with pytest.raises(ValueError, match="'b'.*NaN or Inf"):
            st.put(["a", "b"], x)
        assert len(st) == 0
    assert (tmp_path / "s" / DATA_FILE).stat().st_size == 0


def test_validation_messages(tmp_path: Path) -> None:
    with TokenStore(tmp_path / "s") as st:
        x = batch(["a", "b"])
        with pytest.raises(ValueError, match="2 ids but tokens has 1"):
            st.put(["a", "b"], x[:1])
        with pytest.raises(ValueError, match="3-D"):
            st.put(["a"], x[0])
        with pytest.raises(ValueError, match="float array"):
            st.put(["a"], np.zeros((1, Q, D), np.int32))
        with pytest.raises(ValueError, match="non-empty"):
            st.put([""], x[:1])
        with pytest.raises(ValueError, match="newline"):
            st.put(["a\nb"], x[:1])
        with pytest.raises(ValueError, match="must be str"):
            st.put([3], x[:1])
        with pytest.raises(TypeError, match="single string"):
            st.put("a", x[:1])
        with pytest.raises(ValueError, match="float16 range"):
            st.put(["a"], np.full((1, Q, D), 1e6, np.float32))
        assert len(st) == 0
        st.put([], np.zeros((0, Q, D), np.float16))  # empty batch: no-op
        assert len(st) == 0


def test_duplicate_ids_rejected_nothing_written(tmp_path: Path) -> None:
    with TokenStore(tmp_path / "s") as st:
        st.put(["a", "b"], batch(["a", "b"]))
        size = (tmp_path / "s" / DATA_FILE).stat().st_size
        with pytest.raises(ValueError, match="'b' is already in the store"):
            st.put(["c", "b"], batch(["c", "b"]))
        with pytest.raises(ValueError, match="'c' appears more than once"):
            st.put(["c", "d", "c"], batch(["c", "d", "c"]))
        assert st.ids() == ["a", "b"] and "c" not in st
        assert (tmp_path / "s" / DATA_FILE).stat().st_size == size
        np.testing.assert_array_equal(st.get(["b"]), batch(["b"]))  # unchanged


# -------------------------------------------------------------------- int8


def test_int8_size_and_accuracy(tmp_path: Path) -> None:
    q, d = 64, 384
    rng = np.random.default_rng(1)
    # Per-token magnitudes vary a lot: per-token scales must keep small tokens accurate.
    x = rng.standard_normal((5, q, d)) * rng.uniform(0.01, 30.0, size=(5, q, 1))
    x[2, 7] = 0.0  # an all-zero token (scale 0) must come back as zeros
    keys = [f"k{i}" for i in range(5)]
    with TokenStore(tmp_path / "s", dtype="int8") as st:
        st.put(keys, x.astype(np.float32))
        assert st.bytes_per_entry == q * d + 4 * q
    assert (tmp_path / "s" / DATA_FILE).stat().st_size == 5 * (q * d + 4 * q)
    with TokenStore(tmp_path / "s") as st:  # dtype comes from the store
        assert st.dtype == "int8"
        got = st.get(keys)
        assert got.dtype == np.float16 and got.shape == (5, q, d)
        np.testing.assert_array_equal(got[2, 7], 0)
        g = got.astype(np.float64)
        rel = np.linalg.norm(g - x, axis=2) / np.maximum(np.linalg.norm(x, axis=2), 1e-12)
        assert rel.max() < 0.01
        # Symmetric rounding: error per value at most half a quantisation step (+ fp16 rounding).
        step = np.abs(x).max(axis=2, keepdims=True) / 127
        assert np.all(np.abs(g - x) <= 0.5 * step + 1e-3 * np.abs(x) + 1e-6)
        np.testing.assert_array_equal(st.get_rows([3]), got[3:4])
        st.verify()


# ------------------------------------------------------- locking, readers, repair


def test_second_writer_locked_and_readonly_reader(tmp_path: Path) -> None:
    st = TokenStore(tmp_path / "s")
    st.put(["a"], batch(["a"]))
    with pytest.raises(StoreLockedError, match="already open for writing"):
        TokenStore(tmp_path / "s")
    with TokenStore(tmp_path / "s", readonly=True) as ro:
        assert ro.ids() == ["a"]
        with pytest.raises(PermissionError):
            ro.put(["b"], batch(["b"]))
        st.put(["b", "c"], batch(["b", "c"]))
        assert len(ro) == 1
        assert ro.refresh() == 2
        np.testing.assert_array_equal(ro.get(["c", "a"]), batch(["c", "a"]))
    st.close()
    st.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        st.get(["a"])
    with TokenStore(tmp_path / "s") as st2:  # lock released by close
        assert len(st2) == 3


def test_torn_tail_is_discarded_on_open(tmp_path: Path) -> None:
    s = tmp_path / "s"
    with TokenStore(s) as st:
        st.put(["a", "b"], batch(["a", "b"]))
    bpe = Q * D * 2
    # Simulate a put killed after writing data and half an index record.
    with open(s / DATA_FILE, "ab") as f:
        f.write(b"\x01" * (bpe + 17))
    good_index = (s / INDEX_FILE).read_bytes()
    with open(s / INDEX_FILE, "ab") as f:
        f.write(b'1234abcd {"first": 2, "ids": ["c"')
    with TokenStore(s, readonly=True) as ro:  # readers ignore the tail, repair nothing
        assert ro.ids() == ["a", "b"]
    assert (s / DATA_FILE).stat().st_size == 3 * bpe + 17
    with TokenStore(s) as st:
        assert st.ids() == ["a", "b"]
        assert (s / DATA_FILE).stat().st_size == 2 * bpe
        assert (s / INDEX_FILE).read_bytes() == good_index
        st.put(["c"], batch(["c"]))
        np.testing.assert_array_equal(st.get(["a", "b", "c"]), batch(["a", "b", "c"]))
        st.verify()
    # A complete line with a bad checksum at the end is also a torn commit.
    with open(s / INDEX_FILE, "ab") as f:
        f.write(b'00000000 {"first": 3, "ids": ["d"], "data_crc": 0}\n')
    with TokenStore(s) as st:
        assert st.ids() == ["a", "b", "c"]


def test_corruption_is_reported_not_dropped(tmp_path: Path) -> None:
    s = tmp_path / "s"
    with TokenStore(s) as st:
        st.put(["a"], batch(["a"]))
        st.put(["b"], batch(["b"]))
    lines = (s / INDEX_FILE).read_bytes().splitlines(keepends=True)
    (s / INDEX_FILE).write_bytes(lines[0].replace(b'"a"', b'"x"') + lines[1])
    with pytest.raises(StoreCorruptError, match="followed by valid records"):
        TokenStore(s)
    (s / INDEX_FILE).write_bytes(b"".join(lines))
    with open(s / DATA_FILE, "r+b") as f:
        f.truncate(Q * D * 2 + 5)
    with pytest.raises(StoreCorruptError, match="commits 2 rows"):
        TokenStore(s)
    with open(s / DATA_FILE, "r+b") as f:
        f.truncate(2 * Q * D * 2)
    with TokenStore(s) as st, pytest.raises(StoreCorruptError, match="checksum"):
        st.verify()  # zero-filled bytes no longer match the commit's CRC
    meta = json.loads((s / META_FILE).read_text())
    assert meta == {
        "format": "edje-token-store",
        "version": 1,
        "dtype": "float16",
        "num_tokens": Q,
        "width": D,
    }


# -------------------------------------------------------------- crash safety

CQ, CD = 16, 64

CHILD = """
import sys, zlib
import numpy as np
from edje_client.store import TokenStore

path, it, q, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def tok(key):
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return rng.standard_normal((q, d)).astype(np.float16)

st = TokenStore(path)
print("READY", flush=True)
rng = np.random.default_rng(it)
b = 0
while True:
    n = int(rng.integers(1, 17))
    ids = [f"i{it}-b{b}-{k}of{n}" for k in range(n)]
    st.put(ids, np.stack([tok(i) for i in ids]))
    print(" ".join(ids), flush=True)
    b += 1
"""


def _run_and_kill(path: Path, it: int, delay: float) -> list[str]:
    """Start a child appending batches, SIGKILL it after ``delay`` s; return reported ids."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(it), str(CQ), str(CD)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[bytes] = []
    first = proc.stdout.readline()
    if first != b"READY\n":
        proc.kill()
        raise AssertionError(f"child failed to start: {first!r} {proc.stderr.read()!r}")
    drain = threading.Thread(target=lambda: lines.extend(proc.stdout))
    drain.start()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    drain.join()
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert rc == -signal.SIGKILL, (rc, err)
    # A line cut by the kill (no newline) was not fully reported; ignore it.
    return [k for ln in lines if ln.endswith(b"\n") for k in ln.decode().split()]


def test_sigkill_during_puts_never_loses_or_tears_commits(tmp_path: Path) -> None:
    s = tmp_path / "s"
    TokenStore(s, num_tokens=CQ, width=CD).close()
    bpe = CQ * CD * 2
    rnd = random.Random(1234)
    expected: dict[str, np.ndarray] = {}
    reported: list[str] = []
    torn_tails = 0
    for it in range(25):
        reported += _run_and_kill(s, it, rnd.uniform(0.0, 0.12))
        with TokenStore(s, readonly=True) as st:  # the next child repairs the tail itself
            keys = st.ids()
            assert len(st) == len(keys) == len(set(keys))
            assert [st.index_of(k) for k in keys] == list(range(len(keys)))
            torn_tails += (s / DATA_FILE).stat().st_size > len(keys) * bpe
            # Every id the child reported as committed is there, in order.
            assert keys[: len(reported)] == reported
            # At most one batch committed but not yet reported, and it is whole.
            batches: dict[tuple[str, int], set[int]] = {}
            for k in keys:
                prefix, _, kn = k.rpartition("-")
                kk, n = map(int, kn.split("of"))
                batches.setdefault((prefix, n), set()).add(kk)
            for (prefix, n), ks in batches.items():
                assert ks == set(range(n)), f"torn batch {prefix}: {sorted(ks)} of {n}"
            unreported = {k.rpartition("-")[0] for k in keys[len(reported) :]}
            assert len(unreported) <= 1
            reported = keys
            # Content of every committed entry, old and new, is intact.
            for k in keys:
                if k not in expected:
                    expected[k] = tok(k, CQ, CD)
            got = st.get(keys)
            np.testing.assert_array_equal(got, np.stack([expected[k] for k in keys]))
            st.verify()
    with TokenStore(s) as st:
        assert len(st) == len(reported) > 0
        assert (s / DATA_FILE).stat().st_size == len(st) * bpe
        np.testing.assert_array_equal(st.get_rows(np.arange(len(st))[::-1]), got[::-1])
    print(f"{len(reported)} entries over 25 kills; {torn_tails} kills left a torn data tail")
