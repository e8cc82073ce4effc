"""The training record beside the weights: ``training.json`` and a readable ``TRAINING.md``."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from edje.synthetic import TIERS
from edje.training.recipe import Recipe


def write_training_record(out: Path, recipe: Recipe, report: dict) -> None:
    """``training.json`` (recipe, command, report) and a readable ``TRAINING.md`` beside the
    weights, so a shipped default always says exactly what made it.

    ``report`` is a test report (:func:`edje.training.evaluation.evaluate`) plus
    ``train_seconds``, ``stage1_seconds``, ``stage2_steps`` and ``validation_curve``.
    """
    command = "python -m edje.train " + shlex.join(sys.argv[1:])  # as typed in a shell
    record = {"command": command, "recipe": asdict(recipe), "report": report}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    kinds = "\n".join(
        f"| {k} | {v['queries']} | {v['first_stage']:.1f} | {v['reranked']:.1f} |"
        for k, v in report.get("text_to_image_r1_by_kind", {}).items()
    )
    tiers = "\n".join(
        f"| {r['tier']} | {r['kind']} | {r['queries']} | {r['first_stage_R@1']:.1f} | "
        f"{r['reranked_R@1']:.1f} |"
        for r in report.get("by_tier", [])
    )
    held = [tier for tier in TIERS if tier != "seen"]

    def curve_row(c: dict) -> str:
        cells = [c["step"], c["minutes"], c["first_stage_R@1"], c["reranked_R@1"]]
        for tier in held:
            cells += [c.get(f"{tier}_first_stage_R@1", "-"), c.get(f"{tier}_reranked_R@1", "-")]
        return "| " + " | ".join(map(str, cells)) + " |"

    curve = "\n".join(curve_row(c) for c in report["validation_curve"])
    first, after = report["text_to_image"]["first_stage"], report["text_to_image"]["reranked"]
    hard = report["text_to_image_r1_hard"]
    gain = round(after["R@1"], 1) - round(first["R@1"], 1)  # of the numbers as printed
    (out / "TRAINING.md").write_text(
        f"""# How this model was made

Made by `{command}` (seed {recipe.seed}) on {time.strftime("%Y-%m-%d")}, in
{report["train_seconds"] / 60:.0f} minutes on this machine ({torch.get_num_threads()} threads):
stage 1 {report["stage1_seconds"]}s, then {report["stage2_steps"]} stage-2 steps. The full
recipe and report are in `training.json`; docs/training.md explains the recipe.

## Held-out test split, seen tier (`python -m edje.train evaluate --source DIR`)

Text->image R@1 over {report["num_captions"]} queries against a gallery of {report["num_images"]}
images: first stage {first["R@1"]:.1f}, after EDJE re-ranks the top 10
**{after["R@1"]:.1f}** (gain {gain:.1f}); hard subset
({hard["queries"]} queries) {hard["first_stage"]:.1f} ->
**{hard["reranked"]:.1f}**. First-stage R@10: {first["R@10"]:.1f}.

| kind | queries | first stage R@1 | re-ranked R@1 |
| --- | --- | --- | --- |
{kinds}

## Every evaluation tier, by kind

`seen`: phrasings and drawing style as in training; `held_out_phrasing`: templates training
never sees; `held_out_rendering`: a drawing style training never sees (blur, noise, JPEG).

| tier | kind | queries | first stage R@1 | re-ranked R@1 |
| --- | --- | --- | --- | --- |
{tiers}

## Validation during training (val split: seen, held-out phrasing, held-out rendering)

| step | min | first stage | re-ranked | phrasing: first | re-ranked | render: first | re-ranked |
| --- | --- | --- | --- | --- | --- | --- | --- |
{curve}
"""
    )
