"""``make bench``, collections section: the token bank's gather against an in-RAM numpy gather.

At 50k pairs/s on a GPU the bank must hand the ranker ~640 random token blocks per request
without becoming the bottleneck, so the bank's gather is measured against the floor: a numpy
gather of the same rows from an array already in memory. Lance's own ``take`` (what the bank
would cost without its in-memory copy) is measured beside them. All three run interleaved,
round by round, on one collection of real-size tokens (64 x 384 fp16).
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from edje.build_repo import TEMPLATE_DIR


def load_bank_module():
    """The token bank's store (``_shared/edje_bank.py``), exactly as the server runs it."""
    path = TEMPLATE_DIR / "_shared" / "edje_bank.py"
    spec = importlib.util.spec_from_file_location("edje_bank", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section_gather(
    work: Path, rows: int = 20_000, gather: int = 640, rounds: int = 20, q: int = 64, d: int = 384
) -> dict:
    """Median ms of a random ``gather``-row gather: bank, numpy in RAM, Lance ``take``."""
    from edje_client.collection import CollectionSpec, ImageCollection

    path = work / f"gather_{rows}"
    rng = np.random.default_rng(0)
    collection = ImageCollection(path, spec=CollectionSpec(q, d, 8))
    if len(collection) != rows:
        shutil.rmtree(path, ignore_errors=True)
        collection = ImageCollection(path, spec=CollectionSpec(q, d, 8))
        for start in range(0, rows, 2000):
            n = min(2000, rows - start)
            emb = rng.standard_normal((n, 8)).astype(np.float32)
            collection.add(
                [f"i{start + k}" for k in range(n)],
                rng.standard_normal((n, q, d)).astype(np.float16),
                emb / np.linalg.norm(emb, axis=1, keepdims=True),
            )
        collection.optimize()
    t0 = time.perf_counter()
    bank = load_bank_module().TokenBank(str(path), 1 << 40, (q, d))
    load_s = time.perf_counter() - t0
    in_ram = bank.tokens[:rows].copy()  # the floor: an array that is already in memory
    picks = [rng.integers(0, rows, gather) for _ in range(rounds)]
    times: dict[str, list[float]] = {"bank": [], "numpy_in_ram": [], "lance_take": []}
    for ids in picks:
        for name in times:
            start = time.perf_counter()
            if name == "bank":
                out = bank.gather(ids)
            elif name == "numpy_in_ram":
                out = np.take(in_ram, ids, axis=0)
            else:
                out = collection.tokens(ids)
            times[name].append(time.perf_counter() - start)
        assert out.shape == (gather, q, d)
    np.testing.assert_array_equal(bank.gather(picks[0]), collection.tokens(picks[0]))
    median = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    size = collection.size_bytes()
    return {
        "rows": rows,
        "gather": gather,
        "rounds": rounds,
        "median_ms": median,
        "bank_over_numpy": median["bank"] / median["numpy_in_ram"],
        "lance_over_numpy": median["lance_take"] / median["numpy_in_ram"],
        "bank_load_s": load_s,
        "bank_bytes": int(bank.tokens[:rows].nbytes),
        "disk_bytes_per_image": size / rows,
        "raw_bytes_per_image": q * d * 2 + 8 * 4,
    }


def markdown_lines(g: dict) -> list[str]:
    """The collections section of ``performance.md``."""
    m = g["median_ms"]
    ok = "met" if g["bank_over_numpy"] <= 1.5 else "short"
    return [
        "## 6. Collections: the token bank's gather",
        "",
        f"A random {g['gather']}-id gather from a collection of {g['rows']:,} images of 64 x 384 "
        f"fp16 tokens, median of {g['rounds']} interleaved rounds:",
        "",
        "| Gather | ms | / numpy in RAM |",
        "| --- | --- | --- |",
        f"| numpy, array already in RAM (the floor) | {m['numpy_in_ram']:.1f} | 1.00x |",
        f"| token bank (`edje_bank.TokenBank.gather`) | {m['bank']:.1f} | "
        f"{g['bank_over_numpy']:.2f}x (target <= 1.5x: {ok}) |",
        f"| Lance `take` + decode (no in-memory copy) | {m['lance_take']:.1f} | "
        f"{g['lance_over_numpy']:.2f}x |",
        "",
        f"The bank read the whole collection into memory in {g['bank_load_s']:.1f} s "
        f"({g['bank_bytes'] / 1e9:.2f} GB for {g['rows']:,} images, i.e. "
        f"{g['bank_bytes'] / g['rows']:,.0f} bytes per image per replica). On disk: "
        f"{g['disk_bytes_per_image']:,.0f} bytes per image against {g['raw_bytes_per_image']:,} "
        "raw (tokens + an 8-d embedding).",
        "",
    ]
