"""``make bench``: where EDJE's time goes, measured side by side in one run.

Every figure that matters is a *ratio* of two measurements taken in the same run, interleaved
round by round, because this machine is shared and noisy. Sections:

1. **Ranker, model level (real size: MiniLM-L12-H384, Q=64, random weights):** PyTorch eager vs
   ONNX Runtime fp32 as exported vs fused (``optimize_ranker``) vs int8, each interleaved with
   fp32 and int8 GEMM references in the same rounds (:mod:`edje.tools.bench_ranker`).
2. **int8 agreement** on the default model: top-1 agreement and Spearman correlation against
   fp32 over real re-rank lists (:mod:`edje.tools.bench_ranker`).
3. **EDJE vs an online-ViT joint scorer** (BLIP-style: the ViT runs for every pair) at the real
   sizes (SigLIP2-L/16 at 384 px + MiniLM-L12): ratio of pairs/s.
4. **Served:** Triton ``edje_rank`` (embedded server), a K x concurrency grid over gRPC and
   HTTP with p50/p95/p99 latency; ``edje_rank_by_id`` against token passing (bytes on the wire, pairs/s).
5. **Bytes and images:** bytes per pair on the wire, storage per image, indexing images/s.
6. **Collections:** the token bank's random gather against an in-RAM numpy gather and Lance's
   ``take`` (:mod:`edje.tools.bench_collections`); then the HTTP API over direct gRPC
   (:mod:`edje.tools.bench_api`).
7. **Serving defaults:** the sweep of the ranker's queue delay x instances x ORT threads at 1, 4
   and 16 clients, K = 10 and 64, the defaults its rule picks, and served / raw ONNX Runtime for
   the shipped defaults and the variants around them (:mod:`edje.tools.bench_serving`). 1 s
   cells here (its ``bench`` plan); ``--full-sweep``: the 2 s cells of ``docs/serving.json``,
   which is then written too; ``--quick``: its smaller grid.

Writes ``bench_results.json``, PNG plots and ``performance.md`` into ``--out`` (default ``docs``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edje.configuration import (
    published_language_config,
    published_vision_config,
)
from edje.tools.bench_api import markdown_lines as api_lines
from edje.tools.bench_api import section_api
from edje.tools.bench_collections import markdown_lines as gather_lines
from edje.tools.bench_collections import section_gather
from edje.tools.bench_ranker import (
    TEXT_LEN,
    D,
    Q,
    headline_rows,
    pair_inputs,
    section_int8_agreement,
    section_ranker,
    timed_rounds,
)
from edje.tools.bench_ranker import markdown_lines as ranker_lines
from edje.tools.bench_serving import headline_rows as serving_headline_rows
from edje.tools.bench_serving import markdown_lines as serving_lines

log = logging.getLogger("edje.tools.bench")

K_SERVED = 64  # candidates per request where rank-by-id meets token passing


def section_online_vit(rounds: int) -> dict:
    """EDJE (tokens precomputed) vs a joint scorer that runs the ViT for every pair."""
    from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking

    vision, language = published_vision_config(), published_language_config()
    indexing = EDJEModelForIndexing(
        vision_config=vision, language_config=language, num_compressed_tokens=Q
    ).eval()
    ranking = EDJEModelForRanking(language_config=language, num_compressed_tokens=Q).eval()
    pixels = torch.randn(1, 3, 384, 384)
    feeds = {
        k: torch.from_numpy(v) for k, v in pair_inputs(1, TEXT_LEN, ranking.image_token_id).items()
    }

    def index_one() -> None:
        with torch.inference_mode():
            indexing(pixels)

    def rank_one() -> None:
        with torch.inference_mode():
            ranking.score_pairs(**feeds)

    times = timed_rounds({"vit_adapter": index_one, "ranker": rank_one}, rounds)
    vit, rank = statistics.median(times["vit_adapter"]), statistics.median(times["ranker"])
    return {
        "vit_adapter_s_per_image": vit,
        "ranker_s_per_pair_batch1": rank,
        "edje_pairs_per_s": 1 / rank,
        "online_vit_pairs_per_s": 1 / (vit + rank),
        "edje_over_online_vit": (vit + rank) / rank,
        "real_size_index_images_per_s": 1 / vit,
    }


def _load(url: str, protocol: str, request: Callable, concurrency: int, seconds: float) -> dict:
    """Closed-loop load: ``concurrency`` threads, each with its own client, for ``seconds``."""
    import importlib

    from tritonclient.utils import InferenceServerException

    module = importlib.import_module(f"tritonclient.{protocol}")
    latencies: list[float] = []
    rejected = [0]
    lock, stop = threading.Lock(), threading.Event()
    barrier = threading.Barrier(concurrency + 1)

    def worker() -> None:
        client = module.InferenceServerClient(url)
        call = request(module, client)
        with contextlib.suppress(InferenceServerException):
            call()  # warm-up and connection
        barrier.wait()
        while not stop.is_set():
            start = time.perf_counter()
            try:
                call()
            except InferenceServerException:  # shed by the queue policy (UNAVAILABLE)
                with lock:
                    rejected[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = np.array(latencies or [float("nan")]) * 1e3
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests": len(latencies),
        "rejected": rejected[0],
    }


def rank_request(k: int, q: int, d: int, text: bytes = b"a red circle left of a blue square"):
    tokens = np.random.default_rng(k).standard_normal((k, q, d)).astype(np.float16)
    texts = np.array([[text]] * k, dtype=object)

    def make(module, client):
        inputs = [
            module.InferInput("text", [k, 1], "BYTES"),
            module.InferInput("compressed_tokens", [k, q, d], "FP16"),
        ]
        inputs[0].set_data_from_numpy(texts)
        inputs[1].set_data_from_numpy(tokens)
        return lambda: client.infer("edje_rank", inputs)

    return make


def by_id_request(k: int, rows: int, text: bytes = b"a red circle left of a blue square"):
    ids = np.random.default_rng(k).integers(0, rows, k).astype(np.int64)

    def make(module, client):
        inputs = [
            module.InferInput("text", [1], "BYTES"),
            module.InferInput("image_ids", [k], "INT64"),
        ]
        inputs[0].set_data_from_numpy(np.array([text], dtype=object))
        inputs[1].set_data_from_numpy(ids)
        return lambda: client.infer("edje_rank_by_id", inputs)

    return make


def section_served(source, work: Path, seconds: float, ks, concurrencies) -> dict:
    """The K x concurrency grid over gRPC and HTTP; rank-by-id vs tokens."""
    from edje.build_repo import RepoSettings, build_repository
    from edje_client.collection import ImageCollection
    from edje_client.server import TritonServer

    store = ImageCollection(work / "bank_store")
    ranking, _ = source.build_ranking_model()
    q, d = ranking.num_compressed_tokens, ranking.language_model.config.hidden_size
    rng = np.random.default_rng(1)
    rows = 512
    if len(store) == 0:
        emb = rng.standard_normal((rows, 8)).astype(np.float32)
        store.add(
            [f"i{i}" for i in range(rows)],
            rng.standard_normal((rows, q, d)).astype(np.float16),
            emb / np.linalg.norm(emb, axis=1, keepdims=True),
        )
    repo = build_repository(source, work / "repo", RepoSettings(token_bank=str(store.path)))
    result: dict = {"model": source.description, "grid": []}
    with TritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, log_file=work / "tritonserver.log"
    ) as server:
        for protocol in ("grpc", "http"):
            for k in ks:
                for c in concurrencies:
                    cell = _load(server.url(protocol), protocol, rank_request(k, q, d), c, seconds)
                    cell.update(
                        protocol=protocol,
                        k=k,
                        concurrency=c,
                        pairs_per_s=cell["requests_per_s"] * k,
                    )
                    log.info(
                        "served %s K=%d c=%d: %.0f pairs/s p50 %.0f ms",
                        protocol,
                        k,
                        c,
                        cell["pairs_per_s"],
                        cell["p50_ms"],
                    )
                    result["grid"].append(cell)
        k, c = K_SERVED, 4
        tokens = _load(server.grpc_url, "grpc", rank_request(k, q, d), c, seconds)
        by_id = _load(server.grpc_url, "grpc", by_id_request(k, rows), c, seconds)
        result["by_id"] = {
            "k": k,
            "concurrency": c,
            "tokens_pairs_per_s": tokens["requests_per_s"] * k,
            "by_id_pairs_per_s": by_id["requests_per_s"] * k,
            "by_id_over_tokens": by_id["requests_per_s"] / tokens["requests_per_s"],
            "tokens_bytes_per_pair": q * d * 2 + len(b"a red circle left of a blue square") + 4,
            "by_id_bytes_per_pair": 8 + (len(b"a red circle left of a blue square") + 4) / k,
        }
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "PNG")
        payload = np.array([[buf.getvalue()]] * 16, dtype=object)

        def index_request(module, client):
            inputs = [module.InferInput("image", [16, 1], "BYTES")]
            inputs[0].set_data_from_numpy(payload)
            return lambda: client.infer("edje_index", inputs)

        idx = _load(server.grpc_url, "grpc", index_request, 2, seconds)
        result["index_images_per_s"] = idx["requests_per_s"] * 16
    store.close()
    return result


def plots(results: dict, out: Path) -> list[str]:
    """PNG plots: pairs/s per method; served latency and throughput against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    r = results["ranker"]["pairs_per_s"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(r), list(r.values()), color=["#888", "#3a7", "#2a5", "#37a"][: len(r)])
    ax.set_ylabel("pairs / s")
    ax.set_title(f"Real-size ranker on this CPU (batch {results['ranker']['batch']})")
    fig.tight_layout()
    fig.savefig(out / "bench_ranker.png", dpi=110)
    names.append("bench_ranker.png")
    plt.close(fig)

    grid = results["served"]["grid"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for protocol, style in (("grpc", "-"), ("http", "--")):
        for k in sorted({c["k"] for c in grid}):
            cells = [c for c in grid if c["protocol"] == protocol and c["k"] == k]
            xs = [c["concurrency"] for c in cells]
            axes[0].plot(
                xs, [c["pairs_per_s"] for c in cells], style, marker="o", label=f"{protocol} K={k}"
            )
            axes[1].plot(
                xs, [c["p50_ms"] for c in cells], style, marker="o", label=f"{protocol} K={k}"
            )
    axes[0].set_ylabel("pairs / s")
    axes[1].set_ylabel("p50 latency (ms)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
    axes[0].legend(fontsize=7)
    fig.suptitle("Triton edje_rank (embedded server, default model)")
    fig.tight_layout()
    fig.savefig(out / "bench_served.png", dpi=110)
    names.append("bench_served.png")
    plt.close(fig)
    return names


def markdown(results: dict, command: str) -> str:
    """``performance.md``."""
    r, v, s, a, b = (results[k] for k in ("ranker", "online_vit", "served", "int8", "bytes"))
    lines = [
        "# Performance",
        "",
        f"Measured by `{command}` on {results['machine']} ({results['date']}). The machine is",
        "shared and noisy: compare the **ratios**, each taken side by side in one run; absolute",
        "numbers move from run to run. Regenerate this page with the command above. What was",
        "changed to get here, expected against measured: [optimisations.md](optimisations.md).",
        "",
        "## Headline ratios",
        "",
        "| What | Measured | Target | Status |",
        "| --- | --- | --- | --- |",
        *headline_rows(r, a),
        f"| EDJE / online-ViT joint scorer (real sizes) | {v['edje_over_online_vit']:.0f}x | >= 20x | "
        f"{'met' if v['edje_over_online_vit'] >= 20 else 'short'} |",
        f"| rank-by-id / token passing, pairs/s (K={s['by_id']['k']}, {s['by_id']['concurrency']} clients) | "
        f"{s['by_id']['by_id_over_tokens']:.2f}x | - | - |",
        f"| bytes on the wire per pair: tokens / by id | {s['by_id']['tokens_bytes_per_pair']:,.0f} / "
        f"{s['by_id']['by_id_bytes_per_pair']:.1f} | - | - |",
        *serving_headline_rows(results["serving"]),
        "",
        *ranker_lines(r, a),
        "## 3. EDJE against an online-ViT joint scorer",
        "",
        f"SigLIP2-L/16 at 384 px + adapter: {v['vit_adapter_s_per_image']:.2f} s per image "
        f"({v['real_size_index_images_per_s']:.2f} images/s indexing at real size, torch eager). "
        f"A BLIP-style scorer pays that for every pair: {v['online_vit_pairs_per_s']:.2f} pairs/s, "
        f"against EDJE's {v['edje_pairs_per_s']:.1f} pairs/s (batch 32, same engine): "
        f"**{v['edje_over_online_vit']:.0f}x**.",
        "",
        "## 4. Served by Triton (embedded server, python runtime, default model)",
        "",
        f"Model: {s['model']}. Served / raw ONNX Runtime at the served session options: section 8.",
        "",
        "| Protocol | K | Clients | pairs/s | p50 ms | p95 ms | p99 ms | shed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {c['protocol']} | {c['k']} | {c['concurrency']} | {c['pairs_per_s']:.0f} | "
            f"{c['p50_ms']:.0f} | {c['p95_ms']:.0f} | {c['p99_ms']:.0f} | {c['rejected']} |"
            for c in s["grid"]
        ],
        "",
        "![served](bench_served.png)",
        "",
        f"`edje_rank_by_id` (token bank) against `edje_rank` (tokens in the request), K={s['by_id']['k']}, "
        f"{s['by_id']['concurrency']} gRPC clients: {s['by_id']['by_id_pairs_per_s']:.0f} vs "
        f"{s['by_id']['tokens_pairs_per_s']:.0f} pairs/s.",
        "",
        "## 5. Bytes",
        "",
        f"- Storage per image: {b['fp16_bytes_per_image']:,} bytes fp16, {b['int8_bytes_per_image']:,} "
        f"int8 (Q x D + 4 x Q); per million images {b['fp16_gb_per_million']:.1f} GB fp16, "
        f"{b['int8_gb_per_million']:.1f} GB int8.",
        f"- On the wire per pair: {s['by_id']['tokens_bytes_per_pair']:,.0f} bytes with tokens, "
        f"{s['by_id']['by_id_bytes_per_pair']:.1f} by id. At the model card's 50k pairs/s that is "
        f"{s['by_id']['tokens_bytes_per_pair'] * 5e4 / 1e9:.1f} GB/s against "
        f"{s['by_id']['by_id_bytes_per_pair'] * 5e4 / 1e6:.1f} MB/s.",
        f"- Indexing through Triton (default model): {s['index_images_per_s']:.0f} images/s.",
        "",
        *gather_lines(results["gather"]),
        *api_lines(results["api"]),
        *serving_lines(results["serving"], "8. Serving defaults, by measurement"),
    ]
    return "\n".join(lines)


# Section 7's plan (edje.tools.bench_serving.PLANS) -> the command that runs it.
SERVING_COMMANDS = {
    "bench": "make bench",
    "full": "make bench BENCH_ARGS=--full-sweep",
    "quick": "python -m edje.tools.bench --quick",
}


def serving_plan(args: argparse.Namespace) -> str:
    """The :data:`edje.tools.bench_serving.PLANS` entry section 7 runs."""
    return "full" if args.full_sweep else "quick" if args.quick else "bench"


def section_serving(source, work: Path, plan: str, **overrides) -> dict:
    """The serving sweep, its chosen defaults and the served / raw ratios (``bench_serving``;
    ``overrides``: more keywords of its ``run``)."""
    from edje.tools import bench_serving

    return bench_serving.run(source, work, plan, command=SERVING_COMMANDS[plan], **overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="docs", help="where results.json, plots and performance.md go")
    p.add_argument("--work", default="build/bench")
    p.add_argument("--seconds", type=float, default=3.0, help="duration of each served cell")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model-level ratio")
    p.add_argument("--quick", action="store_true", help="smaller grid (for a smoke run)")
    p.add_argument(
        "--full-sweep",
        action="store_true",
        help="section 7 at full length (2 s cells, about 11 min on 2 cores; also writes "
        "serving.json into --out) instead of 1 s cells",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from edje.build_repo import default_source

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    source = default_source(work / "random_default_source")
    ks, cs = ((10, 64), (1, 4)) if args.quick else ((10, 64, 256), (1, 4, 16))
    results: dict = {
        "machine": f"{torch.get_num_threads()} CPU threads, no GPU",
        "date": time.strftime("%Y-%m-%d"),
    }
    log.info("1/7 real-size ranker: eager vs ONNX Runtime fp32 (plain, fused) vs int8, with GEMMs")
    results["ranker"] = section_ranker(work, batch=32, rounds=args.rounds)
    log.info("2/7 int8 agreement on the default model")
    results["int8"] = section_int8_agreement(source, work)
    log.info("3/7 EDJE vs an online-ViT joint scorer at real size")
    results["online_vit"] = section_online_vit(rounds=max(2, args.rounds // 2))
    log.info("4/7 served by Triton")
    results["served"] = section_served(source, work, args.seconds, ks, cs)
    log.info("5/7 collections: the token bank's gather")
    results["gather"] = section_gather(work, rows=2000 if args.quick else 20_000)
    log.info("6/7 the HTTP API over direct gRPC (the repository section 4 built)")
    results["api"] = section_api(work / "repo", work)
    plan = serving_plan(args)
    log.info("7/7 serving defaults: the sweep (%s plan) and served / raw ONNX Runtime", plan)
    results["serving"] = section_serving(source, work / "serving", plan)
    if plan == "full":
        (out / "serving.json").write_text(json.dumps(results["serving"], indent=2) + "\n")
    results["bytes"] = {
        "fp16_bytes_per_image": Q * D * 2,
        "int8_bytes_per_image": Q * D + 4 * Q,
        "fp16_gb_per_million": Q * D * 2 * 1e6 / 1e9,
        "int8_gb_per_million": (Q * D + 4 * Q) * 1e6 / 1e9,
    }
    results["plots"] = plots(results, out)
    (out / "bench_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "performance.md").write_text(markdown(results, "make bench"))
    log.info("wrote %s", out / "performance.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
