"""Why int8 moves the default's rankings: a fake-quantisation study in PyTorch.

ONNX Runtime's dynamic int8 (``--quantize-ranker int8``) quantises each projection's weights per
output channel and its input activations with one scale per batch. This study simulates that
scheme and the alternatives ORT's CPU kernels do not offer, on the joint encoder's projections
(Q, K, V, attention output, FFN up and down), and reports each one's agreement with fp32 over
the real re-rank lists of ``make bench`` section 2:

* ``weights_only``: int8 weights, fp32 activations (the weights' share of the error);
* ``per_tensor``: uint8 activations, one asymmetric scale per batch (ORT's scheme);
* ``per_token``: one asymmetric scale per position (as LLM int8 kernels do);
* ``smooth_A_per_tensor`` / ``smooth_A_per_token``: SmoothQuant scale migration with strength A
  (activation channel j divided by ``s_j = max|X_j|^A / max|W_j|^(1-A)``, weight row j multiplied
  by it; exact in fp32), ``max|X_j|`` calibrated on validation lists.

``python -m edje.tools.int8_study`` runs it on the shipped default (about 4 minutes).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edje.tools.bench_ranker import agreement
from edje.training.fake_int8 import MODES, fake_int8, projections
from edje.training.rerank_lists import rerank_lists


def scores(ranking: nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The ranker's logits [B, 1] for one re-rank list of ranker feeds."""
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    t["compressed_tokens"] = t["compressed_tokens"].float()
    with torch.no_grad():
        return ranking.score_pairs(**t).float().numpy()[:, None]


def activation_absmax(ranking: nn.Module, lists: list[dict]) -> dict[str, torch.Tensor]:
    """Per projection, the largest |input| of each input channel over ``lists``."""
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in projections(ranking).items():

        def pre(_mod, inputs, name=name):
            a = inputs[0].detach().abs().flatten(0, -2).amax(0)
            found[name] = torch.maximum(found[name], a) if name in found else a

        hooks.append(m.register_forward_pre_hook(pre))
    try:
        for feeds in lists:
            scores(ranking, feeds)
    finally:
        for h in hooks:
            h.remove()
    return found


def smoothing(
    ranking: nn.Module, absmax: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """SmoothQuant's per-input-channel factors ``max|X_j|^alpha / max|W_j|^(1-alpha)``."""
    out = {}
    for name, m in projections(ranking).items():
        w = m.weight.detach().abs().amax(0).clamp_min(1e-5)
        out[name] = absmax[name].clamp_min(1e-5) ** alpha / w ** (1 - alpha)
    return out


def study(
    ranking: nn.Module, lists: list[dict], calibration: list[dict], alphas: Sequence[float]
) -> dict[str, dict]:
    """Agreement with fp32 of each simulated scheme over ``lists``."""
    reference = {id(f): scores(ranking, f) for f in lists}  # fp32, scored once

    def scored() -> dict:
        return agreement(lambda f: reference[id(f)], lambda f: scores(ranking, f), lists)

    report = {}
    with fake_int8(ranking, "none"):
        report["weights_only"] = scored()
    for mode in MODES[1:]:
        with fake_int8(ranking, mode):
            report[mode] = scored()
    absmax = activation_absmax(ranking, calibration)
    for alpha in alphas:
        factors = smoothing(ranking, absmax, alpha)
        for mode in MODES[1:]:
            with fake_int8(ranking, mode, smooth=factors):
                report[f"smooth_{alpha}_{mode}"] = scored()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m edje.tools.int8_study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", help="a model source directory (default: the shipped default)")
    p.add_argument("--work", default="build/int8_study", help="where the default is unpacked")
    p.add_argument("--alphas", default="0.5,0.8", help="SmoothQuant strengths (0.5,0.8)")
    p.add_argument("--lists", type=int, default=0, help="test lists (0: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as make bench section 2 (ORT, 1 thread): same arithmetic order
    from edje.build_repo import default_source
    from edje.model_source import ModelSource

    source = ModelSource.from_dir(args.source) if args.source else default_source(Path(args.work))
    ranking, _ = source.build_ranking_model()
    lists = rerank_lists(source, "test")
    lists = lists[: args.lists] if args.lists else lists
    calibration = rerank_lists(source, "val")[:100:2]  # 50 lists, none of the test split
    alphas = [float(a) for a in args.alphas.split(",") if a]
    report = study(ranking.eval(), lists, calibration, alphas)
    print(json.dumps({"model": source.description, "lists": len(lists), **report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
