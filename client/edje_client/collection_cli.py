"""``edje collection``: inspect, optimise and migrate collections (no server needed)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from edje_client.collection import CollectionMismatchError, CollectionSpec, ImageCollection

COLLECTION_EXAMPLES = """\
examples:
  edje collection info my-photos/
  edje collection info s3://bucket/photos --storage-option region=eu-west-1
  edje collection optimize my-photos/        compact, (re)build the vector index, drop orphans
  edje collection migrate old-store/ my-photos/ --model-id sha256:0123456789abcdef
"""


class UsageError(Exception):
    """A bad path or argument (exit code 2)."""


def storage_options(pairs: Sequence[str] | None) -> dict[str, str] | None:
    """``--storage-option KEY=VALUE`` pairs as Lance storage options."""
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def open_collection(
    args: argparse.Namespace, readonly: bool = False, spec: CollectionSpec | None = None
) -> ImageCollection:
    """The collection named by ``--collection``; a missing or mismatched one is a usage error."""
    try:
        return ImageCollection(
            args.collection,
            readonly=readonly,
            spec=spec,
            storage_options=storage_options(args.storage_option),
        )
    except (CollectionMismatchError, FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _human(n: int | None) -> str:
    if n is None:
        return "n/a (object store)"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    with open_collection(args, readonly=True) as collection:
        info = collection.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"collection  {info['uri']}")
    print(f"rows        {info['rows']}")
    if info["rows"]:
        print(
            f"tokens      Q={info['num_tokens']} x D={info['token_width']} "
            f"({info['token_dtype']}), embedding E={info['embedding_dim']}"
        )
        print(f"model       {info['model_id']}")
        print(
            f"versions    {info['version']} (latest), {info['versions']} kept, "
            f"{info['fragments']} fragments"
        )
        print(f"indices     {', '.join(info['indices']) or 'none'}")
        print(f"metadata    {', '.join(info['metadata_columns']) or 'none'}")
        per_image = info["bytes_per_image"]
        print(
            f"size        {_human(info['size_bytes'])}"
            + (f" ({per_image} bytes per image)" if per_image else "")
        )
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    with open_collection(args) as collection:
        before = collection.size_bytes()
        report = collection.optimize(remove_orphans=not args.keep_orphans)
        after = collection.size_bytes()
    print(
        f"optimized {args.collection}: {report['compacted_fragments']} fragments compacted, "
        f"vector index: {report['index']}, {_human(report['bytes_removed'])} removed "
        f"({_human(before)} -> {_human(after)})"
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from edje_client.legacy_store import migrate

    report = migrate(
        args.old,
        args.collection,
        model_id=args.model_id,
        token_dtype=args.token_dtype,
        storage_options=storage_options(args.storage_option),
        progress=True,
    )
    print(
        f"migrated {report['rows']} rows from {args.old} to {args.collection} in "
        f"{report['seconds']:.1f} s; every row checked against the source"
    )
    return 0


def add_collection_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``edje collection info|optimize|migrate`` on the ``edje`` parser."""
    parser = commands.add_parser(
        "collection",
        help="inspect, optimise or migrate a collection",
        description="Manage a collection (a Lance dataset of ids, tokens and embeddings).",
        epilog=COLLECTION_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def add(name: str, func, summary: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary)
        p.set_defaults(func=func)
        p.add_argument(
            "--storage-option",
            action="append",
            metavar="KEY=VALUE",
            help="object-store option passed to Lance; repeatable",
        )
        return p

    p = add("info", cmd_info, "rows, Q/D/E, model, versions and size of a collection")
    p.add_argument("collection", metavar="PATH|URI")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add(
        "optimize",
        cmd_optimize,
        "compact fragments, build or refresh the vector index, remove old versions and the "
        "orphan files of crashed writers (run it while no other writer is active)",
    )
    p.add_argument("collection", metavar="PATH|URI")
    p.add_argument(
        "--keep-orphans",
        action="store_true",
        help="keep unreferenced data files (safe while another writer is active)",
    )

    p = add(
        "migrate",
        cmd_migrate,
        "convert a format-1 token store (tokens/, embeddings.f32) into a new collection, "
        "checking every row against the source",
    )
    p.add_argument("old", metavar="OLD_STORE")
    p.add_argument("collection", metavar="NEW")
    p.add_argument(
        "--model-id",
        default="",
        help="the model that made the tokens (`edje-build-repo` prints it; default: unknown)",
    )
    p.add_argument(
        "--token-dtype", choices=("float16", "int8"), help="default: the old store's dtype"
    )
