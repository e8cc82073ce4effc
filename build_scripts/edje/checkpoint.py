"""Load EDJE weights from the research layout (``{"model": state_dict}``) or safetensors.

Unlike the seed's ``load_state_dict(..., strict=False)``, :func:`load_into` accounts for every
key: it raises :class:`CheckpointError` naming any key the model needs but the file lacks, or
whose shape differs, and reports which file keys were used and which ignored.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Keys a model holds but inference never reads (training-only heads).
OPTIONAL_PREFIXES: tuple[str, ...] = ("language_model.cls.",)
# (research name, name in this transformers) prefixes. transformers 5 flattened
# SiglipVisionModel (``vision_model.embeddings`` became ``embeddings``); the published research
# checkpoint uses the older, nested names, and so do the checkpoints this project writes. The
# models accept both (see ``edje.modeling.accept_nested_siglip_names``).
NESTED_VISION, FLAT_VISION = "vision_encoder.vision_model.", "vision_encoder."


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


def to_research_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict of this transformers' models to the research checkpoint's names."""
    return {
        NESTED_VISION + k[len(FLAT_VISION) :]
        if k.startswith(FLAT_VISION) and not k.startswith(NESTED_VISION)
        else k: v
        for k, v in state_dict.items()
    }


def _is_optional(key: str) -> bool:
    return key.startswith(OPTIONAL_PREFIXES)


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy every tensor the model needs from ``state_dict``; fail loudly on gaps.

    Raises
    ------
    CheckpointError
        If a required key is missing or a shape differs; the message names the keys.
    """
    try:
        result = model.load_state_dict(dict(state_dict), strict=False)
    except RuntimeError as exc:  # size mismatches, one line each in torch's message
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}: {'; '.join(lines)}"
        ) from None
    missing = [k for k in result.missing_keys if not _is_optional(k)]
    if missing:
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}: "
            f"{len(missing)} required keys missing: {_head(missing)}"
        )
    unexpected = set(result.unexpected_keys)
    return LoadReport(
        used=[k for k in state_dict if k not in unexpected],
        ignored=sorted(unexpected),
        missing_optional=list(result.missing_keys),
    )


def _head(items: Iterable[str], n: int = 8) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def write_updated_source(
    source: str | Path, out: str | Path, checkpoint: str | Path, new: Mapping[str, torch.Tensor]
) -> Path:
    """Copy the model source directory ``source`` to ``out``, with the tensors ``new`` (this
    transformers' names) replacing theirs in its ``checkpoint``, in the checkpoint's dtype and
    format (safetensors, or a weights-only ``{"model": ...}`` torch file)."""
    out = Path(out)
    if out.resolve() != Path(source).resolve():
        shutil.copytree(source, out, dirs_exist_ok=True)
    state = read_state_dict(checkpoint)
    dtype = next(iter(state.values())).dtype
    state |= {
        k: v.detach().cpu().to(dtype).contiguous().clone()
        for k, v in to_research_layout(new).items()
    }
    path = out / Path(checkpoint).name
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
    return path
