"""The ``edje`` command: index images, search and re-rank them, evaluate, serve the repository.

A *collection* (``--collection``, alias ``--store``) is an
:class:`~edje_client.collection.ImageCollection`: one Lance dataset, in a local directory or at an
object-store URI, holding each image's id, EDJE tokens, first-stage embedding and path.

Exit codes: 0 success, 1 an error (any :class:`~edje_client.errors.EDJEError`: server, network,
collection, launch; some images rejected), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from edje_client._core import default_url
from edje_client.api import command as api_command
from edje_client.client import EDJEClient
from edje_client.collection_cli import (
    UsageError,
    add_collection_commands,
    open_collection,
    storage_options,
)
from edje_client.errors import EDJEError, InvalidInputError, LaunchError
from edje_client.evaluation import KarpathyDataset, evaluate_with_client, markdown_table
from edje_client.results import IndexResult
from edje_client.search import search
from edje_client.server import DEFAULT_HOST, TritonServer

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
SHOWN_FAILURES = 5

INDEX_EXAMPLES = """\
examples:
  edje index photos/ --collection my-photos/       every image under photos/, ids like "2024/a.jpg"
  edje index a.jpg b.png --collection my-photos/   ids "a.jpg" and "b.png"
  edje index photos/ --collection s3://bucket/photos --storage-option region=eu-west-1
  edje index s3://bucket/raw/ --collection s3://bucket/photos --ray --workers 8
  edje index photos/ --collection my-photos/ --ray --repository build/model_repository

Ids already in the collection are skipped, so an interrupted run can simply be repeated.
The collection records the server's model and token shape; indexing into a collection made by
another model is refused.
"""

RERANK_EXAMPLES = """\
examples:
  edje rerank "a dog catching a frisbee" --collection my-photos/ --top-n 5
  edje rerank "a red car" --collection my-photos/ --ids a.jpg b.png --probabilities
  edje rerank "a red car" --collection my-photos/ --by-id   tokens stay on the server
"""

SEARCH_EXAMPLES = """\
examples:
  edje search "a dog catching a frisbee" --collection my-photos/
  edje search "a red car" --collection my-photos/ -k 5 --rerank-top-k 50 --timings
  edje search "a red car" --collection my-photos/ --rerank-top-k 0      first stage only
"""

EVAL_EXAMPLES = """\
examples:
  edje eval dataset_flickr30k.json --images-root flickr30k-images/ --out results/flickr
  edje eval data/test.json -k 10 --split test
  edje eval data/test.json --serve build/model_repository     no running server needed

Writes <out>.json and <out>.md (Recall@1/5/10, first stage vs EDJE re-ranking of the top k).
"""

SERVE_EXAMPLES = """\
examples:
  edje serve                                    build/model_repository on 127.0.0.1:8000/8001
  edje serve --http-port 9000 --grpc-port 9001 --metrics-port 9002

Build the repository first with `make repo`. Stop with Ctrl+C (or SIGTERM).
"""


def find_images(paths: Sequence[str]) -> tuple[list[tuple[str, Path]], int]:
    """``(id, path)`` of every image named or found (recursively) under ``paths``.

    A directory's images get their path relative to it as id; a file given by name gets its
    file name. Returns the pairs in order and how many repeated ids were dropped.
    """
    found: dict[str, Path] = {}
    repeated = 0
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            files = [
                (f.relative_to(path).as_posix(), f)
                for f in sorted(path.rglob("*"))
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            ]
        elif path.is_file():
            files = [(path.name, path)]
        else:
            raise UsageError(f"no such file or directory: {arg}")
        for image_id, file in files:
            repeated += image_id in found
            found.setdefault(image_id, file)
    return list(found.items()), repeated


def index_batch(
    client: EDJEClient, batch: list[tuple[str, Path]]
) -> tuple[list[str], IndexResult | None, list[tuple[str, str]]]:
    """Index a batch; if it is rejected, index its images one by one to find the bad ones.

    Returns the ids indexed, their tokens and embeddings (``None`` when none) and
    ``(id, message)`` of each rejected image.
    """
    try:
        return [i for i, _ in batch], client.index([p for _, p in batch]), []
    except InvalidInputError:
        pass
    ids, results, failures = [], [], []
    for image_id, path in batch:
        try:
            results.append(client.index([path]))
            ids.append(image_id)
        except InvalidInputError as err:
            failures.append((image_id, err.message))
    if not results:
        return ids, None, failures
    merged = IndexResult(
        tokens=np.concatenate([r.tokens for r in results]),
        embeddings=np.concatenate([r.embeddings for r in results]),
    )
    return ids, merged, failures


def cmd_index(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.ray:
        return index_on_ray(args)
    images, repeated = find_images(args.paths)
    failures: list[tuple[str, str]] = []
    with EDJEClient(args.url, args.protocol) as client:
        spec = client.spec.collection_spec(args.token_dtype)
        collection = open_collection(args, spec=spec)
        stored = collection.existing([i for i, _ in images])
        todo = [(i, p) for i, p in images if i not in stored]
        with tqdm(total=len(todo), unit="img", desc="indexing", leave=False) as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start : start + args.batch_size]
                ids, result, failed = index_batch(client, batch)
                if ids:
                    paths = {i: str(p.resolve()) for i, p in batch}
                    collection.add(
                        ids, result.tokens, result.embeddings, {"path": [paths[i] for i in ids]}
                    )
                failures += failed
                bar.update(len(batch))
    if todo:
        collection.first_stage.maintain_index()
    total = len(collection)
    indexed = len(todo) - len(failures)
    print(
        f"indexed {indexed} images into {args.collection} ({total} in the collection); "
        f"{len(images) - len(todo)} already there, {len(failures)} rejected"
        + (f", {repeated} repeated ids ignored" if repeated else "")
    )
    return report_failures(failures)


def report_failures(failures: Sequence[tuple[str, str]]) -> int:
    """Print the first rejected images by id; exit code 1 if any."""
    if failures:
        print(f"edje index: {len(failures)} image(s) rejected:", file=sys.stderr)
        for image_id, message in failures[:SHOWN_FAILURES]:
            print(f"  {image_id}: {message}", file=sys.stderr)
    return 1 if failures else 0


def index_on_ray(args: argparse.Namespace) -> int:
    """``edje index --ray``: list, encode and write in parallel on Ray Data; commit once."""
    from edje_client.distributed import index_with_ray

    if len(args.paths) != 1:
        raise UsageError("--ray takes one directory or object-store prefix")
    if args.repository and args.url:
        raise UsageError("give --url (Triton servers) or --repository (in-process), not both")
    urls = None if args.repository else (args.url or default_url(args.protocol)).split(",")
    report = index_with_ray(
        args.paths[0],
        args.collection,
        urls=urls,
        protocol=args.protocol,
        repository=args.repository,
        batch_size=args.batch_size,
        workers=args.workers,
        storage_options=storage_options(args.storage_option),
        token_dtype=args.token_dtype,
    )
    print(
        f"indexed {report.indexed} images into {args.collection} on Ray in "
        f"{report.seconds:.1f} s; {report.skipped} already there, "
        f"{len(report.failures)} rejected"
    )
    return report_failures(report.failures)


def cmd_rerank(args: argparse.Namespace) -> int:
    if args.top_n is not None and args.top_n < 0:
        raise UsageError("--top-n must be non-negative")
    with open_collection(args, readonly=True) as collection:
        if not len(collection):
            print(f"the collection {args.collection} is empty; fill it with `edje index`")
            return 0
        with EDJEClient(args.url, args.protocol) as client:
            results = client.rerank_collection(
                args.query,
                collection,
                args.ids,
                args.top_n,
                args.probabilities,
                by_id=args.by_id or None,
            )
    label = "probability" if args.probabilities else "score"
    print(f"{'rank':>4}  {label:>11}  id")
    for rank, result in enumerate(results, 1):
        print(f"{rank:>4}  {result.score:>11.4f}  {result.id}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1 or (args.rerank_top_k is not None and args.rerank_top_k < 0):
        raise UsageError("-k must be at least 1 and --rerank-top-k non-negative")
    with open_collection(args, readonly=True) as collection:
        if not len(collection):
            raise UsageError(
                f"the collection {args.collection} is empty; fill it with `edje index`"
            )
        with EDJEClient(args.url, args.protocol) as client:
            response = search(client, collection, args.query, args.k, args.rerank_top_k)
    print(f"{'rank':>4}  {'edje':>8}  {'first':>6}  {'was':>4}  id")
    for rank, hit in enumerate(response.hits, 1):
        edje = f"{hit.score:8.3f}" if hit.score is not None else f"{'-':>8}"
        was = hit.first_stage_rank + 1
        print(f"{rank:>4}  {edje}  {hit.first_stage_score:6.3f}  {was:>4}  {hit.id}")
    if args.timings:
        print("  ".join(f"{k} {v:.1f} ms" for k, v in response.timings_ms.items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        dataset = KarpathyDataset.load(args.dataset, args.split, args.images_root)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot read {args.dataset}: {exc}") from exc
    missing = [p for p in dataset.images if not p.is_file()]
    if missing:
        raise UsageError(f"{len(missing)} images not found, e.g. {missing[0]} (see --images-root)")
    with contextlib.ExitStack() as stack:
        url = args.url
        if args.serve:  # a private embedded server for this run, on free loopback ports
            server = TritonServer(Path(args.serve), http_port=0, grpc_port=0, metrics_port=0)
            url = stack.enter_context(server).url(args.protocol)
        client = stack.enter_context(EDJEClient(url, args.protocol))
        report = evaluate_with_client(client, dataset, k=args.k, progress=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(
        f"re-ranking fixed {report['text_to_image_fixed']} text->image top-1 results and broke "
        f"{report['text_to_image_broken']}"
    )
    for ex in report.get("fixed_examples", []):
        print(
            f"  fixed: {ex['query']!r}: first stage {ex['first_stage_top1']}, "
            f"re-ranked {ex['reranked_top1']}"
        )
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    repository = Path(args.model_repository)
    if not repository.is_dir():
        raise UsageError(f"model repository not found: {repository} (build it with `make repo`)")
    server = TritonServer(
        repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
    )
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        try:
            server.start()
        except LaunchError as err:
            if server.process is None:  # refused before launch: a taken port, a bad path
                raise UsageError(str(err)) from err
            raise
        print(
            f"serving {repository}\n"
            f"  HTTP     http://{server.http_url}\n"
            f"  gRPC     {server.grpc_url}\n"
            f"  metrics  http://{server.host}:{server.metrics_port}/metrics\n"
            f"  log      {server.log_file}\n"
            "Press Ctrl+C to stop.",
            flush=True,
        )
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                raise LaunchError(
                    f"tritonserver exited with code {server.process.returncode}:\n"
                    f"{server.log_tail()}"
                )
        print("stopping the server", flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("server")
    group.add_argument(
        "--url",
        help="server host:port (default 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http)",
    )
    group.add_argument(
        "--protocol", choices=("grpc", "http"), default="grpc", help="default: %(default)s"
    )
    return parent


def _collection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("collection")
    group.add_argument(
        "--collection",
        "--store",
        dest="collection",
        required=True,
        metavar="PATH|URI",
        help="the collection: a local directory or an object-store URI (s3://, gs://, az://)",
    )
    group.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="object-store option passed to Lance (credentials, region, endpoint); repeatable",
    )
    return parent


def _add_command(
    commands: argparse._SubParsersAction,
    func: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
    examples: str,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    name = func.__name__.removeprefix("cmd_")
    parser = commands.add_parser(
        name,
        parents=list(parents),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help=summary,
        description=description,
        epilog=examples,
    )
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``edje`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="edje",
        description="EDJE vision-language re-ranking on Triton: index images, re-rank them "
        "for a text query, serve the model repository.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    server = [_connection_options()]
    collection = [_collection_options()]

    p = _add_command(
        commands,
        cmd_index,
        "index images into a collection",
        "Index images (jpg, jpeg, png, webp, gif, bmp, tiff; directories are searched "
        "recursively) and append their tokens, embeddings and paths to a collection.",
        INDEX_EXAMPLES,
        [*server, *collection],
    )
    p.add_argument("paths", nargs="+", metavar="DIR|FILE", help="directories or image files")
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="images indexed and committed to the collection per step (default: %(default)s)",
    )
    p.add_argument(
        "--token-dtype",
        choices=("float16", "int8"),
        default="float16",
        help="token storage of a new collection (int8: about half the bytes; default: %(default)s)",
    )
    ray = p.add_argument_group("distributed (Ray Data)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="encode on a Ray cluster (RAY_ADDRESS) or locally on Ray; commit once at the end",
    )
    ray.add_argument("--workers", type=int, default=1, help="encoder actors (default: 1)")
    ray.add_argument(
        "--repository",
        metavar="DIR",
        help="with --ray and no --url: run this model repository's vision adapter in-process "
        "on each worker (its GPU where there is one)",
    )

    p = _add_command(
        commands,
        cmd_rerank,
        "re-rank stored images for a text query",
        "Score a text query against images of a collection; print them best first.",
        RERANK_EXAMPLES,
        [*server, *collection],
    )
    p.add_argument("query", help="the text query")
    p.add_argument("--ids", nargs="+", metavar="ID", help="only these ids (default: all)")
    p.add_argument("--top-n", type=int, help="show only the best N (default: all)")
    p.add_argument(
        "--probabilities", action="store_true", help="print sigmoid(logit) instead of logits"
    )
    p.add_argument(
        "--by-id",
        action="store_true",
        help="send image ids to the server's token bank, not tokens (default: when the "
        "server's bank is this collection)",
    )

    p = _add_command(
        commands,
        cmd_search,
        "search stored images for a text query (first stage + EDJE)",
        "Find the images nearest to a text query by first-stage (SigLIP) embeddings, then "
        "re-rank the best candidates with EDJE. Re-ranked candidates come first; the others "
        "keep their first-stage order ('was' is the first-stage rank).",
        SEARCH_EXAMPLES,
        [*server, *collection],
    )
    p.add_argument("query", help="the text query")
    p.add_argument("-k", type=int, default=10, help="results to show (default: %(default)s)")
    p.add_argument(
        "--rerank-top-k",
        type=int,
        help="first-stage candidates EDJE re-ranks (default: k; 0 = first stage only)",
    )
    p.add_argument("--timings", action="store_true", help="print where the time went")

    p = _add_command(
        commands,
        cmd_eval,
        "Recall@K of first stage vs EDJE re-ranking on a Karpathy-format dataset",
        "Index a dataset's images, embed its captions, and report Recall@1/5/10 for "
        "text->image and image->text: the first stage alone, and after EDJE re-ranks its "
        "top k (as in the EDJE paper).",
        EVAL_EXAMPLES,
        server,
    )
    p.add_argument("dataset", help="Karpathy-format JSON (images with sentences)")
    p.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    p.add_argument("--images-root", help="directory of the image files (default: the JSON's)")
    p.add_argument("-k", type=int, default=10, help="candidates re-ranked (default: 10)")
    p.add_argument("--out", default="build/eval/report", help="output path without suffix")
    p.add_argument(
        "--serve",
        metavar="REPOSITORY",
        help="start the embedded server on this model repository for the run (ignores --url)",
    )

    add_collection_commands(commands)

    p = _add_command(
        commands,
        api_command.cmd_api,
        api_command.SUMMARY,
        api_command.DESCRIPTION,
        api_command.EXAMPLES,
        [*server, *collection],
    )
    api_command.add_api_arguments(p)

    p = _add_command(
        commands,
        cmd_serve,
        "serve a model repository with the embedded tritonserver",
        "Run tritonserver on a model repository in the foreground.",
        SERVE_EXAMPLES,
    )
    p.add_argument(
        "--model-repository",
        default="build/model_repository",
        help="repository directory (default: %(default)s)",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)")
    for name, port in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        p.add_argument(f"--{name}-port", type=int, default=port, help="default: %(default)s")
    p.add_argument(
        "--log-file",
        type=Path,
        help="server log (default: a temporary file; '-': this process's stdout, for containers)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edje`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage errors
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except UsageError as err:
        print(f"edje {args.command}: error: {err}", file=sys.stderr)
        return 2
    except EDJEError as err:
        print(f"edje {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
