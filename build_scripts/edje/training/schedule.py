"""Every schedule of training, as a function of progress (the fraction of training done).

One learning-rate schedule serves both stages (:func:`lr_multiplier`); stage two's curriculum
(how many negatives are mined, how deep, how much distillation) follows the same progress,
which runs on steps or, with a time budget, on wall time.
"""

from __future__ import annotations

import math

from edje.training.recipe import StageTwo


def lr_multiplier(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``progress`` 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def progress(cfg: StageTwo, step: int, elapsed: float) -> float:
    """Fraction of stage two done: by steps, or by wall time when ``time_budget`` is set."""
    done = step / cfg.steps
    if cfg.time_budget > 0:
        done = max(done, elapsed / cfg.time_budget)
    return min(1.0, done)


def hard_share(cfg: StageTwo, progress: float) -> float:
    """Share of negatives drawn from the first stage's top-k (the rest are random)."""
    ramp = cfg.curriculum
    share = 1.0 if ramp <= 0 else min(1.0, progress / ramp)
    return share * cfg.max_hard_share


def twin_share(cfg: StageTwo, progress: float) -> float:
    """Share of wrong images drawn from the caption's binding twins: 0 before ``twin_from``,
    then ``twin_share`` scaled like the hard share (it rises with it)."""
    if progress < cfg.twin_from:
        return 0.0
    return cfg.twin_share * hard_share(cfg, progress) / max(cfg.max_hard_share, 1e-9)


def grounds_relations(cfg: StageTwo, progress: float) -> bool:
    """Whether relation words are grounded now: with ``ground_relations``, from
    ``ground_relations_from`` on."""
    return cfg.ground_relations and progress >= cfg.ground_relations_from


def hard_k(cfg: StageTwo, progress: float, mined: int) -> int:
    """How deep in the first stage's ranking hard negatives are drawn (shrinks in training);
    at most ``mined``, the depth that was mined."""
    done = min(1.0, progress / max(1e-9, cfg.hard_k_decay))
    k = cfg.hard_k * (cfg.hard_k_min / cfg.hard_k) ** done
    return max(1, min(int(round(k)), mined))


def distill_weight(cfg: StageTwo, progress: float) -> float:
    """Distillation weight now: ``distill_weight`` falling to 0 at ``distill_until``."""
    return cfg.distill_weight * max(0.0, 1.0 - progress / max(1e-9, cfg.distill_until))
