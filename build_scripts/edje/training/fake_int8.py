"""ONNX Runtime's dynamic int8 ranker, simulated in PyTorch (and differentiable, for training).

``--quantize-ranker int8`` quantises each projection of the joint encoder (Q, K, V, attention
output, FFN up and down) with int8 weights, one symmetric scale per output channel, and uint8
input activations with one asymmetric scale per batch. :func:`fake_int8` makes a ranking model
compute exactly that (or the alternatives ORT's CPU kernels do not offer) inside a ``with``
block. Rounding passes gradients straight through, and each scale stays a function of the range
it is taken from (a gradient that shrinks an outlier shrinks its whole tensor's rounding step),
so the same block serves the study of schemes (``edje.tools.int8_study``) and can be trained
through (the quantisation-aware fine-tune of docs/optimisations.md row 32 was).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "per_tensor", "per_token")


def projections(ranking: nn.Module) -> dict[str, nn.Linear]:
    """The joint encoder's projections (every ``nn.Linear`` of its layers)."""
    return {
        name: m
        for name, m in ranking.language_model.named_modules()
        if isinstance(m, nn.Linear) and ".layer." in name
    }


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer forward, the identity backward (straight through)."""
    return x + (x.round() - x).detach()


def quantise_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8, one scale per output channel (rows of ``nn.Linear.weight``)."""
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return _round(w / scale).clamp(-127, 127) * scale


def quantise_activation(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Asymmetric uint8 (range widened to hold 0, as ``DynamicQuantizeLinear``): one scale
    over the whole tensor (``per_tensor``) or per position (``per_token``); ``none``: ``x``."""
    if mode == "none":
        return x
    if mode == "per_tensor":
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    elif mode == "per_token":
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        hi = x.amax(-1, keepdim=True).clamp(min=0)
    else:
        raise ValueError(f"unknown activation mode {mode!r}; expected one of {MODES}")
    scale = (hi - lo).clamp_min(1e-12) / 255
    zero = _round(-lo / scale)
    return (_round(x / scale) + zero).clamp(0, 255).sub(zero) * scale


@contextlib.contextmanager
def fake_int8(
    ranking: nn.Module,
    mode: str = "per_tensor",
    weights: bool = True,
    smooth: dict[str, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Within the block, every projection of ``ranking`` divides its input by ``smooth[name]``
    (per input channel; weights multiplied to match), quantises it (``mode``) and uses int8
    ``weights``. Parameters are never changed, and gradients reach them."""
    if mode not in MODES:
        raise ValueError(f"unknown activation mode {mode!r}; expected one of {MODES}")
    layers = projections(ranking)
    for name, m in layers.items():
        s = None if smooth is None else smooth[name]

        def forward(x: torch.Tensor, m: nn.Linear = m, s: torch.Tensor | None = s):
            w = m.weight if s is None else m.weight * s
            x = x if s is None else x / s
            w = quantise_weight(w) if weights else w
            return F.linear(quantise_activation(x, mode), w, m.bias)

        m.forward = forward  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        for m in layers.values():
            del m.forward
