"""Export EDJE's two networks to ONNX, with dynamic batch (and sequence) axes.

* ``vision_adapter.onnx``: ``pixel_values`` FP32 [B,3,H,W] ->
  ``compressed_tokens`` FP16 [B,Q,D], ``image_embedding`` FP32 [B,E].
* ``ranker.onnx``: ``input_ids``, ``attention_mask``, ``token_type_ids`` INT64 [B,L] and
  ``compressed_tokens`` FP16 [B,Q,D] -> ``score`` FP32 [B,1] (the matching logit).
* ``text_encoder.onnx``: ``input_ids`` INT64 [B,L] -> ``text_embedding`` FP32 [B,E], the
  L2-normalised first-stage (SigLIP) text embedding, in the space of ``image_embedding``.

Both pass ``onnx.checker``. Models over 2 GB are written with external data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import SiglipTextModel

from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking

OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3


class _VisionAdapterGraph(nn.Module):
    def __init__(self, model: EDJEModelForIndexing) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.encode(pixel_values)
        return out.compressed_tokens.to(torch.float16), out.image_embedding


class _RankerGraph(nn.Module):
    def __init__(self, model: EDJEModelForRanking) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        compressed_tokens: torch.Tensor,
    ) -> torch.Tensor:
        score = self.model.score_pairs(input_ids, attention_mask, token_type_ids, compressed_tokens)
        return score.unsqueeze(-1)


class _TextEncoderGraph(nn.Module):
    def __init__(self, model: SiglipTextModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pooled = self.model(input_ids=input_ids).pooler_output
        return nn.functional.normalize(pooled, dim=-1)


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python-int shapes
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    if n_bytes >= PROTOBUF_LIMIT:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    onnx.checker.check_model(str(path))  # a path, so external data is checked too
    return path


def export_vision_adapter(model: EDJEModelForIndexing, path: str | Path) -> Path:
    """Export image -> (fp16 compressed tokens, fp32 normalised image embedding)."""
    size = model.image_size
    pixel_values = torch.randn(2, 3, size, size)
    return _export(
        _VisionAdapterGraph(model),
        (pixel_values,),
        Path(path),
        ["pixel_values"],
        ["compressed_tokens", "image_embedding"],
        {
            "pixel_values": {0: "batch"},
            "compressed_tokens": {0: "batch"},
            "image_embedding": {0: "batch"},
        },
    )


def export_ranker(model: EDJEModelForRanking, path: str | Path, seq_len: int = 16) -> Path:
    """Export full pair layouts + fp16 tokens -> fp32 logits [B,1]."""
    q = model.num_compressed_tokens
    width = model.language_model.config.hidden_size
    length = seq_len + q
    input_ids = torch.full((2, length), model.image_token_id, dtype=torch.long)
    input_ids[:, :seq_len] = 1
    attention_mask = torch.ones((2, length), dtype=torch.long)
    token_type_ids = torch.zeros((2, length), dtype=torch.long)
    tokens = torch.randn(2, q, width).to(torch.float16)
    seq_axes = {0: "batch", 1: "sequence"}
    return _export(
        _RankerGraph(model),
        (input_ids, attention_mask, token_type_ids, tokens),
        Path(path),
        ["input_ids", "attention_mask", "token_type_ids", "compressed_tokens"],
        ["score"],
        {
            "input_ids": seq_axes,
            "attention_mask": seq_axes,
            "token_type_ids": seq_axes,
            "compressed_tokens": {0: "batch"},
            "score": {0: "batch"},
        },
    )


def export_text_encoder(model: SiglipTextModel, path: str | Path, seq_len: int = 16) -> Path:
    """Export first-stage text ids -> normalised text embedding."""
    input_ids = torch.ones((2, seq_len), dtype=torch.long)
    return _export(
        _TextEncoderGraph(model),
        (input_ids,),
        Path(path),
        ["input_ids"],
        ["text_embedding"],
        {"input_ids": {0: "batch", 1: "sequence"}, "text_embedding": {0: "batch"}},
    )


def quantize_int8(path: str | Path, out: str | Path | None = None) -> Path:
    """Dynamic int8 quantisation of a graph's MatMul weights (ONNX Runtime), in place by default.

    Activations stay float and are quantised per batch at run time; the graph's inputs and
    outputs are unchanged, so the Triton configs need no change.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = Path(out) if out else path
    tmp = out.with_name(out.stem + ".int8-tmp.onnx")
    quantize_dynamic(
        str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
    )
    tmp.replace(out)
    onnx.checker.check_model(str(out))
    return out
