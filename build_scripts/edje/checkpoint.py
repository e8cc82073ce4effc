"""Load EDJE weights from the research layout (``{"model": state_dict}``) or safetensors.

Unlike the seed's ``load_state_dict(..., strict=False)``, :func:`load_into` accounts for every
key: it raises :class:`CheckpointError` naming any key the model needs but the file lacks, or
whose shape differs, and reports which file keys were used and which ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Keys a model holds but inference never reads (training-only heads).
OPTIONAL_PREFIXES: tuple[str, ...] = ("language_model.cls.",)


class CheckpointError(ValueError):
    """The checkpoint file does not fit the model it is loaded into."""


@dataclass
class LoadReport:
    """Which checkpoint keys a model consumed."""

    used: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing_optional: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        prefixes = sorted({k.split(".")[0] for k in self.ignored})
        return (
            f"{name}: loaded {len(self.used)} tensors; ignored {len(self.ignored)} "
            f"(prefixes: {', '.join(prefixes) or 'none'}); "
            f"absent optional {len(self.missing_optional)}"
        )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling objects.

    Torch files are read with ``weights_only=True``; a ``{"model": ...}`` or
    ``{"state_dict": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors name the offending global
        raise CheckpointError(
            f"{path} is not a weights-only torch checkpoint (refusing to unpickle "
            f"arbitrary objects): {exc}"
        ) from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return dict(obj)


def _is_optional(key: str) -> bool:
    return key.startswith(OPTIONAL_PREFIXES)


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy every tensor the model needs from ``state_dict``; fail loudly on gaps.

    Raises
    ------
    CheckpointError
        If a required key is missing or a shape differs; the message names the keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not _is_optional(k)]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} required keys missing: {_head(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_head(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    used = [k for k in own if k in state_dict]
    model.load_state_dict({k: state_dict[k] for k in used}, strict=False)
    return LoadReport(
        used=used,
        ignored=sorted(k for k in state_dict if k not in own),
        missing_optional=[k for k in own if k not in state_dict],
    )


def _head(items: Iterable[str], n: int = 8) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
