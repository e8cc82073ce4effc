"""``make demo``: the main job, end to end, through a real Triton server.

1. Build the model repository from the default model (if missing or stale).
2. Start the embedded tritonserver on free loopback ports.
3. Index a held-out gallery (the synthetic world's test split) through ``edje_index``.
4. Search: first-stage embedding search (``edje_text_embed`` + FAISS), EDJE re-ranks the top 10.
5. Print, for a few queries (some that re-ranking fixed, then hard ones spread over the split),
   the first-stage top 5 and the re-ranked top 5, then Recall@1 overall, per kind and on the
   hard subset.
6. Stop the server, and write a PNG contact sheet (``build/demo/contact_sheet.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from edje.build_repo import MANIFEST, build_repository, default_source
from edje.synthetic import HARD_KINDS, write_karpathy
from edje_client import EDJEClient
from edje_client.collection import ImageCollection
from edje_client.evaluation import KarpathyDataset, evaluate_with_client
from edje_client.search import SearchResponse, search
from edje_client.server import TritonServer

THUMB = 72
TOP = 5
RERANK_K = 10


def ensure_repository(repo: Path, work: Path) -> dict:
    """Build ``repo`` from the default model unless it is already built from that model."""
    source = default_source(work / "random_default_source")
    manifest_path = repo / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        fresh = Path(manifest["checkpoint"]).is_file() and (
            manifest_path.stat().st_mtime >= Path(source.checkpoint).stat().st_mtime
        )
        if fresh and manifest["source"] == source.description:
            return manifest
    print(f"building {repo} from: {source.description}", flush=True)
    build_repository(source, repo)
    return json.loads(manifest_path.read_text())


def pick_queries(dataset: KarpathyDataset, n: int) -> list[int]:
    """Caption indices: hard kinds first (relations, swapped attributes, counts), spread out."""
    hard = [i for i, kind in enumerate(dataset.caption_kind) if kind in HARD_KINDS]
    pool = hard or list(range(len(dataset.captions)))
    step = max(1, len(pool) // n)
    return pool[::step][:n]


def show(response: SearchResponse, truth: str) -> None:
    """Print first-stage and re-ranked top 5 side by side; ``*`` marks the right image."""
    first = sorted(response.hits, key=lambda h: h.first_stage_rank)[:TOP]
    print(f'\nquery: "{response.query}"')
    print(f"  {'first stage (cosine)':<34}  {'EDJE re-ranked (logit)':<34}")
    for a, b in zip(first, response.hits[:TOP], strict=True):
        left = f"{'*' if a.id == truth else ' '} {a.first_stage_score:6.3f}  {a.id}"
        edje = f"{b.score:7.3f}" if b.score is not None else "      -"
        right = f"{'*' if b.id == truth else ' '} {edje}  {b.id}"
        print(f"  {left:<34}  {right:<34}")


def contact_sheet(rows: list[tuple[str, list[Path], list[Path], Path]], out: Path) -> Path:
    """One row per query: the text, the first-stage top 5 and the re-ranked top 5."""
    pad, text_w = 8, 300
    width = text_w + 2 * TOP * (THUMB + pad) + 3 * pad
    height = 28 + len(rows) * (THUMB + 2 * pad)
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    left0 = text_w + pad
    right0 = left0 + TOP * (THUMB + pad) + pad
    draw.text((left0, 8), "first stage top 5", fill=(0, 0, 0))
    draw.text((right0, 8), "EDJE re-ranked top 5", fill=(0, 0, 0))
    for r, (query, first, reranked, truth) in enumerate(rows):
        y = 28 + r * (THUMB + 2 * pad) + pad
        words, line, lines = query.split(), "", []
        for word in words:  # wrap the query to the text column
            if len(line) + len(word) > 44:
                lines.append(line)
                line = ""
            line += word + " "
        lines.append(line)
        draw.multiline_text((pad, y), "\n".join(lines), fill=(0, 0, 0))
        for x0, paths in ((left0, first), (right0, reranked)):
            for i, path in enumerate(paths):
                x = x0 + i * (THUMB + pad)
                sheet.paste(Image.open(path).convert("RGB").resize((THUMB, THUMB)), (x, y))
                colour = (20, 170, 40) if path == truth else (200, 200, 200)
                draw.rectangle(
                    (x - 3, y - 3, x + THUMB + 2, y + THUMB + 2), outline=colour, width=3
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def run(work: Path, repo: Path, queries: int) -> int:
    started = time.perf_counter()
    manifest = ensure_repository(repo, work)
    if manifest["random_weights"]:
        print("WARNING: the model has RANDOM weights; rankings below are meaningless.", flush=True)
    dataset_path = write_karpathy(work / "gallery", "test", seed=0)
    dataset = KarpathyDataset.load(dataset_path)
    store_path = work / "store"
    shutil.rmtree(store_path, ignore_errors=True)  # a fresh gallery each run
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
        print(f"tritonserver ready on {server.grpc_url} (gRPC), {server.http_url} (HTTP)")
        with EDJEClient(server.grpc_url) as client:
            store = ImageCollection(store_path, spec=client.spec.collection_spec())
            t0 = time.perf_counter()
            indexed = client.index(dataset.images, progress=True)
            ids = [p.name for p in dataset.images]
            store.add(ids, indexed.tokens, indexed.embeddings)
            print(
                f"indexed {len(ids)} gallery images in {time.perf_counter() - t0:.1f} s "
                f"({indexed.tokens[0].nbytes} bytes of tokens each)"
            )
            report = evaluate_with_client(client, dataset, RERANK_K, indexed=indexed)
            # Show some queries re-ranking fixed, then hard queries spread over the split.
            fixed = [ex["caption"] for ex in report["fixed_examples"]]
            shown = fixed[: queries // 2]
            shown += [q for q in pick_queries(dataset, queries) if q not in shown]
            print(
                f"\n{min(len(fixed), queries // 2)} of the queries below are ones re-ranking "
                "fixed; the rest are hard queries spread over the split (* = the right image)"
            )
            sheet_rows = []
            for q in shown[:queries]:
                response = search(client, store, dataset.captions[q], k=RERANK_K)
                truth = ids[dataset.caption_image[q]]
                show(response, truth)
                first = sorted(response.hits, key=lambda h: h.first_stage_rank)[:TOP]
                root = dataset.images[0].parent
                sheet_rows.append(
                    (
                        dataset.captions[q],
                        [root / h.id for h in first],
                        [root / h.id for h in response.hits[:TOP]],
                        root / truth,
                    )
                )
    t2i = report["text_to_image"]
    print(
        f"\ntext->image R@1 over {report['num_captions']} held-out queries: first stage "
        f"{t2i['first_stage']['R@1']:.1f}  ->  EDJE re-ranked top {RERANK_K} "
        f"{t2i['reranked']['R@1']:.1f}"
    )
    rows = list(report.get("text_to_image_r1_by_kind", {}).items())
    if "text_to_image_r1_hard" in report:
        rows.append(("hard subset", report["text_to_image_r1_hard"]))
    for kind, row in rows:
        print(
            f"  {kind:<15} ({row['queries']:>4} queries): {row['first_stage']:5.1f} -> "
            f"{row['reranked']:5.1f}"
        )
    sheet = contact_sheet(sheet_rows, work / "contact_sheet.png")
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\ncontact sheet: {sheet}\nreport: {work / 'report.json'}\n"
        f"done in {time.perf_counter() - started:.0f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="build/demo", help="output directory (default build/demo)")
    p.add_argument("--model-repository", default="build/model_repository")
    p.add_argument("--queries", type=int, default=6, help="queries shown in full (default 6)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run(Path(args.work), Path(args.model_repository), args.queries)


if __name__ == "__main__":
    sys.exit(main())
