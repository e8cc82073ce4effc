"""Export EDJE's two networks to ONNX, with dynamic batch (and sequence) axes.

* ``vision_adapter.onnx``: ``pixel_values`` FP32 [B,3,H,W] ->
  ``compressed_tokens`` FP16 [B,Q,D], ``image_embedding`` FP32 [B,E].
* ``ranker.onnx``: ``input_ids``, ``attention_mask``, ``token_type_ids`` INT64 [B,L] and
  ``compressed_tokens`` FP16 [B,Q,D] -> ``score`` FP32 [B,1] (the matching logit).
* ``text_encoder.onnx``: ``input_ids`` INT64 [B,L] -> ``text_embedding`` FP32 [B,E], the
  L2-normalised first-stage (SigLIP) text embedding, in the space of ``image_embedding``.

All pass ``onnx.checker``. Models over 2 GB are written with external data. The ranker then goes
through :func:`optimize_ranker` (ONNX Runtime's transformer fusions) and, optionally,
:func:`quantize_int8`; both keep its inputs and outputs, so the Triton configs do not change.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter
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


@contextlib.contextmanager
def _eager_attention(model: EDJEModelForRanking):
    """Trace BERT's attention as explicit MatMul/Softmax (the pattern ONNX Runtime's attention
    fusion matches) instead of PyTorch's SDPA, whose export it does not recognise."""
    language_model = model.language_model
    before = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        language_model.set_attn_implementation(before)


def export_ranker(
    model: EDJEModelForRanking,
    path: str | Path,
    seq_len: int = 16,
    *,
    eager_attention: bool = True,
) -> Path:
    """Export full pair layouts + fp16 tokens -> fp32 logits [B,1].

    Attention is traced as eager MatMul/Softmax, which :func:`optimize_ranker` fuses;
    ``eager_attention=False`` keeps the model's own implementation (PyTorch's SDPA).
    """
    q = model.num_compressed_tokens
    width = model.language_model.config.hidden_size
    length = seq_len + q
    input_ids = torch.full((2, length), model.image_token_id, dtype=torch.long)
    input_ids[:, :seq_len] = 1
    attention_mask = torch.ones((2, length), dtype=torch.long)
    token_type_ids = torch.zeros((2, length), dtype=torch.long)
    tokens = torch.randn(2, q, width).to(torch.float16)
    seq_axes = {0: "batch", 1: "sequence"}
    with _eager_attention(model) if eager_attention else contextlib.nullcontext():
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


def op_counts(path: str | Path) -> Counter:
    """How many nodes of each operator type a graph holds."""
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _save(model: onnx.ModelProto, out: Path) -> Path:
    """Write atomically, without ``value_info``, and check.

    Dropping the stored intermediate shapes keeps ONNX Runtime from re-fusing ``Add`` +
    ``LayerNormalization`` into ``SkipLayerNormalization`` when it loads the graph (its fusion
    needs those shapes): on CPU that kernel is several times slower than the two it replaces
    (docs/optimisations.md). The runtime infers every shape it needs anyway.
    """
    del model.graph.value_info[:]
    tmp = out.with_name(out.stem + ".tmp.onnx")
    external = model.ByteSize() >= PROTOBUF_LIMIT
    onnx.save_model(model, str(tmp), save_as_external_data=external, location=out.name + ".data")
    tmp.replace(out)
    onnx.checker.check_model(str(out))
    return out


# ONNX Runtime's FusionOptions per target of optimize_ranker, on top of its BERT defaults
# (docs/optimisations.md has the measurements behind each choice).
FUSIONS: dict[str, dict[str, object]] = {
    # Attention (packed Q/K/V) and BiasGelu per layer; Add + LayerNorm stay two operators.
    "cpu": {"enable_skip_layer_norm": False, "enable_bias_skip_layer_norm": False},
    # ... and SkipLayerNormalization: one kernel on CUDA.
    "cuda": {},
    # For quantize_int8: GELU fused without its bias (which the int8 MatMul then takes), the
    # attention left as MatMuls (int8 Q/K/V projections; scores and softmax in fp32).
    "int8": {
        "enable_attention": False,
        "enable_bias_gelu": False,
        "enable_skip_layer_norm": False,
        "enable_bias_skip_layer_norm": False,
    },
}


def optimize_ranker(
    path: str | Path,
    num_heads: int,
    hidden_size: int,
    out: str | Path | None = None,
    *,
    target: str = "cpu",
    **options: object,
) -> Counter:
    """ONNX Runtime's offline BERT fusions on an exported ranker, in place by default.

    ``target="cpu"`` (fp32 on CPU): each encoder layer's attention becomes one ``Attention``
    node (Q, K and V in one packed projection; the 2-D attention mask passed as it is, so any
    padding stays exact) and its bias + GELU one ``BiasGelu`` (exact erf). ``Add`` +
    ``LayerNormalization`` stay two operators: ORT's CPU ``SkipLayerNormalization`` is slower
    than the pair. ``"cuda"`` fuses those too; ``"int8"`` prepares :func:`quantize_int8`
    (see :data:`FUSIONS`). ``EmbedLayerNormalization`` never applies: the ranker writes the
    image tokens into the embeddings in place of the ``<image>`` ids.

    Nothing else: no ORT session-level rewrites are baked in (``opt_level=0``), so the graph
    holds only ONNX and ``com.microsoft`` operators that the CPU and CUDA execution providers
    both run, in Triton's onnxruntime backend as in ONNX Runtime. ``options`` set further
    attributes of ORT's ``FusionOptions`` (the benchmark's variants). Inputs and outputs are
    unchanged. Returns the fused graph's operator counts.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    path = Path(path)
    out = Path(out) if out else path
    fusion = FusionOptions("bert")
    fusion.use_raw_attention_mask(True)
    for name, value in {**FUSIONS[target], **options}.items():
        if not hasattr(fusion, name):
            raise ValueError(f"ONNX Runtime's FusionOptions has no {name!r}")
        setattr(fusion, name, value)
    quiet = logging.getLogger("onnxruntime.transformers")  # one INFO line per fusion
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        optimized = optimize_model(
            str(path),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            opt_level=0,
            optimization_options=fusion,
        )
    finally:
        quiet.setLevel(level)
    optimized.topological_sort()
    model = optimized.model
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _save(model, out)
    return op_counts(out)


def quantize_int8(
    path: str | Path, out: str | Path | None = None, *, keep_fp32: tuple[str, ...] = ()
) -> Path:
    """Dynamic int8 quantisation of a ranker's projections (ONNX Runtime), in place by default.

    Meant for the graph of ``optimize_ranker(..., target="int8")``: every ``MatMul`` with a
    weight (Q, K, V, attention output, FFN up and down) becomes ONNX's
    ``DynamicQuantizeLinear`` + ``MatMulInteger`` with int8 weights, one scale per output
    channel (a fused ``Attention`` would become ORT's CPU-only ``QAttention``). Activations
    are quantised per batch at run time, so no calibration data is needed. What stays fp32:
    the attention scores, softmax and weighted sum (MatMuls of two activations); LayerNorm,
    GELU and the embeddings; the classification head (pooler and logit, two ``Gemm`` on one
    position per pair); and the nodes named in ``keep_fp32``. docs/optimisations.md has the
    measurements behind each choice. The graph's inputs and outputs are unchanged, so the
    Triton configs need no change.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = Path(out) if out else path
    tmp = out.with_name(out.stem + ".int8-tmp.onnx")
    # The quantizer rewrites each Gemm as "<name>_MatMul" (+ Add) before it quantises MatMuls.
    head = [
        name
        for n in onnx.load(str(path), load_external_data=False).graph.node
        if n.op_type == "Gemm"
        for name in (n.name, n.name + "_MatMul")
    ]
    quiet = logging.getLogger()  # the quantizer warns on the root logger about pre-processing
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(path),
            str(tmp),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Attention"],
            per_channel=True,
            nodes_to_exclude=[*head, *keep_fp32],
            # Contrib operators (Attention, BiasGelu) have no ONNX shape inference: their
            # outputs are fp32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        quiet.setLevel(level)
    model = onnx.load(str(tmp))
    tmp.unlink()
    return _save(model, out)
