"""First-stage image search: exact numpy vs Lance vector indexes vs FAISS, on one CPU thread.

The first stage is a cosine top-k search over L2-normalised float32 image embeddings. This
benchmark builds seeded synthetic *clustered* collections (``--clusters`` gaussian centres on the
unit sphere, point = centre + isotropic noise of norm ``--noise``, renormalised; queries drawn the
same way, distinct from the data) and, at each size in ``--sizes``, measures for top-10:

* exact numpy search (one matmul + argpartition per query): the ground truth;
* Lance ``IVF_HNSW_SQ`` and ``IVF_PQ`` indexes (cosine, ``num_partitions = round(sqrt(N))``) over a
  grid of ``nprobes`` x ``refine_factor``, and Lance flat search on the unindexed dataset;
* FAISS ``IndexFlatIP`` and ``IndexHNSWFlat(E, 32, METRIC_INNER_PRODUCT)`` at efSearch 64/128.

Each row has recall@10 against exact, median/p95 single-query latency (one query at a time, warm
caches), build seconds and size notes. Everything runs on ONE thread (the env below is forced
before numpy/lance load). Writes JSON to ``--out`` and prints a markdown table.

    python -m edje.tools.bench_first_stage --out docs/first_stage.json [--sizes 2000]
"""

from __future__ import annotations

import os

THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
THREAD_ENV |= {"LANCE_CPU_THREADS": "1", "LANCE_IO_THREADS": "2"}
os.environ["LANCE_INCLUDE_VECTOR_CENTROIDS"] = "false"  # keep index_stats small
os.environ.update(THREAD_ENV)  # must precede the numpy / lance / faiss imports

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

K = 10
Row = dict[str, Any]
COLS = ("N", "method", "params", "recall@10", "p50_ms", "p95_ms", "build_s", "queries", "notes")


def make_data(n: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Return (data[n, E], queries[Q, E]), both float32 and L2-normalised."""
    rng, dim, clusters = np.random.default_rng(args.seed), args.dim, args.clusters
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    scale = np.float32(args.noise / np.sqrt(dim))

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for s in range(0, m, 100_000):
            b = min(m, s + 100_000) - s
            x = (
                centres[rng.integers(0, clusters, b)]
                + rng.standard_normal((b, dim), np.float32) * scale
            )
            out[s : s + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(args.queries)


def timed(
    queries: np.ndarray, search: Callable[[np.ndarray], np.ndarray], warm: int = 5
) -> tuple[np.ndarray, list[float]]:
    """Run ``search`` one query at a time; return (ids[nq, K], per-query seconds)."""
    for q in queries[:warm]:
        search(q)
    ids, secs = np.full((len(queries), K), -1, dtype=np.int64), []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        r = search(q)
        secs.append(time.perf_counter() - t)
        ids[i, : len(r)] = r[:K]
    return ids, secs


def row(
    n: int,
    method: str,
    params: str,
    ids: np.ndarray | None = None,
    gt: np.ndarray | None = None,
    secs: list[float] | None = None,
    build_s: float | None = None,
    notes: str = "",
) -> Row:
    """One result row; ``ids=None`` makes a skipped row (``notes`` says why)."""
    if ids is None or gt is None or not secs:
        return dict(zip(COLS, (n, method, params, None, None, None, None, 0, notes), strict=True))
    hits = [np.isin(a, b).sum() for a, b in zip(ids, gt[: len(ids)], strict=True)]
    rec = round(float(np.mean(hits)) / K, 4)
    p50, p95 = (round(float(v) * 1e3, 3) for v in np.percentile(secs, [50, 95]))
    build = None if build_s is None else round(build_s, 2)
    return dict(zip(COLS, (n, method, params, rec, p50, p95, build, len(secs), notes), strict=True))


def dir_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


def exact(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def search(q: np.ndarray) -> np.ndarray:
        s = x @ q
        top = np.argpartition(-s, K)[:K]
        return top[np.argsort(-s[top])]

    return search


def bench_lance(
    x: np.ndarray,
    qs: np.ndarray,
    gt: np.ndarray,
    tmp: Path,
    args: argparse.Namespace,
    left: Callable[[], float],
) -> list[Row]:
    import lance
    import pyarrow as pa

    n, dim = x.shape
    rows: list[Row] = []
    path = tmp / "emb.lance"
    t0 = time.perf_counter()
    tab = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)})
    ds = lance.write_dataset(tab, str(path), max_rows_per_file=n + 1)
    write_s, data_mb = time.perf_counter() - t0, dir_mb(path)
    del tab

    def to_rows(addr: np.ndarray) -> np.ndarray:  # row address = fragment_id << 32 | offset
        base, acc = {}, 0
        for f in sorted(ds.get_fragments(), key=lambda f: f.fragment_id):
            base[f.fragment_id], acc = acc, acc + f.count_rows()
        fid = (addr >> np.uint64(32)).astype(np.int64)
        off = (addr & np.uint64(0xFFFFFFFF)).astype(np.int64)
        return np.array([base[int(f)] for f in fid], dtype=np.int64) + off

    def searcher(**nearest: Any) -> Callable[[np.ndarray], np.ndarray]:
        def search(q: np.ndarray) -> np.ndarray:
            nn = {"column": "embedding", "q": q, "k": K, **nearest}
            kw = {"columns": [], "with_row_address": True, "disable_scoring_autoprojection": True}
            return to_rows(ds.to_table(nearest=nn, **kw)["_rowaddr"].to_numpy())

        return search

    # Flat (no index). Above 100k rows probe 3 queries and measure 20 only if under 2 s each.
    flat, big = searcher(use_index=False), n > 100_000
    probe = float(np.median(timed(qs[:3], flat, warm=0)[1])) if big else 0.0
    if probe > 2.0:
        rows.append(row(n, "lance flat", "use_index=False", notes=f"SKIPPED: {probe:.2f} s/query"))
    else:
        ids, secs = timed(qs[:20] if big else qs, flat, warm=1)
        note = f"build_s = dataset write; data {data_mb:.0f} MB on disk"
        rows.append(row(n, "lance flat", "use_index=False", ids, gt, secs, write_s, note))

    parts = max(1, round(np.sqrt(n)))
    for itype, extra in (("IVF_HNSW_SQ", {}), ("IVF_PQ", {"num_sub_vectors": dim // 8})):
        cargs = ", ".join(f"{k}={v}" for k, v in {"num_partitions": parts, **extra}.items())
        if left() < 0:
            rows.append(row(n, f"lance {itype}", cargs, notes="SKIPPED: size time budget spent"))
            continue
        before = dir_mb(path / "_indices") if (path / "_indices").exists() else 0.0
        t0 = time.perf_counter()
        ikw = {"index_type": itype, "metric": "cosine", "num_partitions": parts, **extra}
        ds = ds.create_index("embedding", replace=True, **ikw)
        build_s = time.perf_counter() - t0
        st = ds.stats.index_stats("embedding_idx")["indices"][0]
        sub = st.get("sub_index", {}).get("params", {})
        sub = ", ".join(f"{k}={v}" for k, v in sub.items() if k in ("m", "ef_construction"))
        note = f"index {dir_mb(path / '_indices') - before:.0f} MB on disk; "
        note += f"{st['num_partitions']} partitions built {sub}".strip()
        # One untimed pass at the widest setting warms the index and data caches.
        timed(qs, searcher(nprobes=max(args.nprobes), refine_factor=max(args.refine)), warm=0)
        for p in args.nprobes:
            for r in [None, *args.refine]:
                ids, secs = timed(qs, searcher(nprobes=p, refine_factor=r))
                prm = f"{cargs}; nprobes={p}, refine_factor={r}"
                rows.append(row(n, f"lance {itype}", prm, ids, gt, secs, build_s, note))
    return rows


def bench_faiss(
    x: np.ndarray, qs: np.ndarray, gt: np.ndarray, left: Callable[[], float]
) -> list[Row]:
    import faiss

    faiss.omp_set_num_threads(1)
    n, dim = x.shape
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    build_s = time.perf_counter() - t0
    ids, secs = timed(qs, lambda q: flat.search(q[None], K)[1][0])
    note = f"{n * dim * 4 / 2**20:.0f} MB in RAM"
    rows = [row(n, "faiss IndexFlatIP", "exact", ids, gt, secs, build_s, note)]
    flat.reset()
    if left() < 0:
        return rows + [
            row(n, "faiss IndexHNSWFlat", "M=32", notes="SKIPPED: size time budget spent")
        ]
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(x)
    build_s = time.perf_counter() - t0
    note = f"~{(x.nbytes + hnsw.hnsw.neighbors.size() * 4) / 2**20:.0f} MB in RAM"
    for ef in (64, 128):
        hnsw.hnsw.efSearch = ef
        ids, secs = timed(qs, lambda q: hnsw.search(q[None], K)[1][0])
        prm = f"M=32, efConstruction={hnsw.hnsw.efConstruction}, efSearch={ef}"
        rows.append(row(n, "faiss IndexHNSWFlat", prm, ids, gt, secs, build_s, note))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in COLS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/first_stage.json"))
    ap.add_argument("--sizes", type=ints, default=[20_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.75, help="noise norm / centre norm")
    ap.add_argument("--nprobes", type=ints, default=[8, 16, 32])
    ap.add_argument("--refine", type=ints, default=[5, 10], help="refine_factor (plus None)")
    ap.add_argument("--budget-s", type=float, default=1500.0, help="wall budget per size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import faiss
    import lance
    import pyarrow as pa

    rows: list[Row] = []
    for n in args.sizes:
        t_size = time.perf_counter()

        def left(t_size: float = t_size) -> float:
            return args.budget_s - (time.perf_counter() - t_size)

        x, qs = make_data(n, args)
        gt, secs = timed(qs, exact(x))
        note = f"{x.nbytes / 2**20:.0f} MB in RAM; ground truth"
        rows.append(row(n, "numpy exact", "matmul + argpartition", gt, gt, secs, 0.0, note))
        with tempfile.TemporaryDirectory(prefix="first_stage_", dir="/tmp") as tmp:
            rows += bench_lance(x, qs, gt, Path(tmp), args, left)
        rows += bench_faiss(x, qs, gt, left)
        print(f"N={n}: {time.perf_counter() - t_size:.0f} s wall", flush=True)
        del x

    machine = {"threads": 1, "thread_env": THREAD_ENV, "faiss_threads": faiss.omp_get_max_threads()}
    machine |= {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    machine |= {m.__name__: m.__version__ for m in (np, lance, pa, faiss)}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config |= {"E": args.dim, "k": K, "latency": "one query at a time, warm caches, one thread"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "config": config, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
