"""``make bench``, HTTP API section: what ``edje api`` costs over calling Triton directly.

The same re-rank, K = 64 stored images for one query, two ways, interleaved call by call:

* **direct:** :meth:`EDJEClient.rerank_collection` over gRPC in this process (ids looked up in
  the collection, tokens gathered and sent, logits ranked, sigmoids);
* **API:** ``POST /v2/rerank`` with the 64 ids (Cohere's shape) to ``edje api`` running in its
  own process, which does the same work behind HTTP and JSON.

Each round times ``calls`` requests of each, one in flight; a round's pairs/s is K x calls over
their summed time, and the figures are medians over rounds (the machine is shared and noisy).
The API's answer is checked against the direct one first. Run alone with
``python -m edje.tools.bench_api`` (builds the default repository unless ``--repository`` is given).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("edje.bench")

K = 64
QUERY = "a red circle left of a blue square"


def measure_api_overhead(
    triton_url: str, collection_path: Path, k: int = K, rounds: int = 7, calls: int = 10
) -> dict:
    """API vs direct gRPC re-ranks of ``k`` stored ids: pairs/s, their ratio, p50 latencies."""
    import httpx

    from edje_client.api.server import api_process
    from edje_client.client import EDJEClient
    from edje_client.collection import ImageCollection

    with (
        ImageCollection(collection_path, readonly=True) as collection,
        EDJEClient(triton_url) as client,
        api_process(collection_path, triton_url) as process,
        httpx.Client(base_url=process.url, timeout=60) as http,
    ):
        ids = collection.ids()[:k]
        if len(ids) < k:
            raise ValueError(f"the collection holds {len(ids)} images, fewer than K = {k}")
        body = {"model": "edje", "query": QUERY, "documents": ids}

        def direct():
            return client.rerank_collection(QUERY, collection, ids, return_probabilities=True)

        def api():
            answer = http.post("/v2/rerank", json=body)
            answer.raise_for_status()
            return answer.json()["results"]

        expected = [(r.index, r.score) for r in direct()]
        got = [(r["index"], r["relevance_score"]) for r in api()]
        if [i for i, _ in got] != [i for i, _ in expected]:
            raise AssertionError("the API's ranking differs from the direct client's")
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=1e-5)
        for _ in range(3):  # warm-up: connections, thread pools, caches
            direct(), api()
        per_round: dict[str, list[float]] = {"direct": [], "api": []}
        latencies: dict[str, list[float]] = {"direct": [], "api": []}
        for n in range(rounds):
            spent = {"direct": 0.0, "api": 0.0}
            pair = (("direct", direct), ("api", api))
            for _ in range(calls):
                for name, fn in pair if n % 2 == 0 else pair[::-1]:
                    start = time.perf_counter()
                    fn()
                    took = time.perf_counter() - start
                    spent[name] += took
                    latencies[name].append(took)
            for name in spent:
                per_round[name].append(k * calls / spent[name])
    ratios = [a / d for a, d in zip(per_round["api"], per_round["direct"], strict=True)]
    p50 = {name: statistics.median(times) * 1e3 for name, times in latencies.items()}
    return {
        "k": k,
        "rounds": rounds,
        "calls_per_round": calls,
        "direct_grpc_pairs_per_s": statistics.median(per_round["direct"]),
        "api_pairs_per_s": statistics.median(per_round["api"]),
        "api_over_grpc": statistics.median(ratios),
        "direct_p50_ms": p50["direct"],
        "api_p50_ms": p50["api"],
        "added_p50_ms": p50["api"] - p50["direct"],
    }


def fill_collection(path: Path, triton_url: str, rows: int = K, seed: int = 0) -> Path:
    """A collection of ``rows`` random token blocks in the served model's shape (the ranker's
    cost does not depend on the values)."""
    from edje_client.client import EDJEClient
    from edje_client.collection import ImageCollection

    with EDJEClient(triton_url) as client:
        spec = client.spec.collection_spec()
    rng = np.random.default_rng(seed)
    with ImageCollection(path, spec=spec) as collection:
        if len(collection) < rows:
            q, d, e = spec.num_tokens, spec.token_width, spec.embedding_dim
            emb = rng.standard_normal((rows, e)).astype(np.float32)
            collection.add(
                [f"bench_{i:05d}.png" for i in range(rows)],
                rng.standard_normal((rows, q, d)).astype(np.float16),
                emb / np.linalg.norm(emb, axis=1, keepdims=True),
            )
    return path


def section_api(repository: Path, work: Path, rounds: int = 7, calls: int = 10) -> dict:
    """Start the embedded Triton on ``repository``, fill a collection, measure the API."""
    from edje_client.server import TritonServer

    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "tritonserver_api.log"
    with TritonServer(
        repository, http_port=0, grpc_port=0, metrics_port=0, log_file=log_file
    ) as server:
        collection = fill_collection(work / "api_collection", server.grpc_url)
        result = measure_api_overhead(server.grpc_url, collection, rounds=rounds, calls=calls)
    log.info(
        "HTTP API at K=%d: %.0f pairs/s vs direct gRPC %.0f (%.2fx); p50 %.1f ms vs %.1f ms "
        "(+%.1f ms)",
        result["k"],
        result["api_pairs_per_s"],
        result["direct_grpc_pairs_per_s"],
        result["api_over_grpc"],
        result["api_p50_ms"],
        result["direct_p50_ms"],
        result["added_p50_ms"],
    )
    return result


def markdown_lines(a: dict) -> list[str]:
    """The HTTP API section of ``performance.md``."""
    ok = "met" if a["api_over_grpc"] >= 0.9 else "short"
    return [
        "## 7. The HTTP API over direct gRPC",
        "",
        f"`POST /v2/rerank` with K = {a['k']} stored ids against `EDJEClient.rerank_collection` "
        f"over gRPC, interleaved, medians: {a['api_pairs_per_s']:.0f} against "
        f"{a['direct_grpc_pairs_per_s']:.0f} pairs/s, **{a['api_over_grpc']:.2f}x** (target "
        f">= 0.9x: {ok}); p50 {a['api_p50_ms']:.1f} against {a['direct_p50_ms']:.1f} ms "
        f"(+{a['added_p50_ms']:.1f} ms).",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repository", type=Path, help="a built model repository (default: build one)")
    p.add_argument("--work", type=Path, default=Path("build/bench"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=10, help="requests of each kind per round")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    repository = args.repository
    if repository is None:
        from edje.build_repo import build_repository, default_source

        source = default_source(args.work / "random_default_source")
        repository = build_repository(source, args.work / "api_repo")
    result = section_api(repository, args.work, args.rounds, args.calls)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
