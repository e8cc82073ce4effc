"""The ranker after ONNX Runtime's transformer fusions (and int8), against PyTorch."""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edje.onnx_export import export_ranker, op_counts, optimize_ranker, quantize_int8
from edje.tiny import BASIC_WORDS
from edje.training.rerank_lists import pair_layouts


@pytest.fixture(scope="module")
def graphs(tiny_models, tmp_path_factory: pytest.TempPathFactory):
    """Paths of the tiny ranker: plain; fused for CPU, CUDA and int8; int8."""
    _, ranking = tiny_models
    out = tmp_path_factory.mktemp("onnx_optimize")
    plain = export_ranker(ranking, out / "plain.onnx")
    config = ranking.language_model.config
    heads, width = config.num_attention_heads, config.hidden_size
    for name, target in (("fused", "cpu"), ("fused_cuda", "cuda"), ("for_int8", "int8")):
        optimize_ranker(plain, heads, width, out / f"{name}.onnx", target=target)
    quantize_int8(out / "for_int8.onnx", out / "int8.onnx")
    names = ("plain", "fused", "fused_cuda", "for_int8", "int8")
    return {name: out / f"{name}.onnx" for name in names}


def _layers(tiny_models) -> int:
    return tiny_models[1].language_model.config.num_hidden_layers


def pair_feeds(tokenizer, batch: int, words: int, seed: int) -> dict[str, np.ndarray]:
    """Serving's pair layout for random captions of up to ``words`` words (ragged padding)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(BASIC_WORDS, k=rng.randint(0, words))) for _ in range(batch)]
    tokens = np.random.default_rng(seed).standard_normal((batch, 64, 384)).astype(np.float16)
    return {**pair_layouts(tokenizer, texts, 64), "compressed_tokens": tokens}


def test_every_encoder_layer_is_fused(graphs, tiny_models):
    layers = _layers(tiny_models)
    fused = op_counts(graphs["fused"])
    # One Attention (packed Q/K/V, mask, softmax, weighted sum) and one BiasGelu per layer.
    assert fused["Attention"] == layers and fused["BiasGelu"] == layers
    # What is left of a layer: attention output, FFN up and FFN down.
    assert fused["MatMul"] == 3 * layers and fused["Softmax"] == fused["Erf"] == 0
    # CPU: residual + LayerNorm stay two operators (faster there); the embeddings' LayerNorm
    # stays too (the image tokens replace word embeddings: no EmbedLayerNormalization).
    assert fused["SkipLayerNormalization"] == 0 and fused["LayerNormalization"] == 2 * layers + 1
    cuda = op_counts(graphs["fused_cuda"])
    assert cuda["Attention"] == layers and cuda["BiasGelu"] == layers
    assert cuda["SkipLayerNormalization"] == 2 * layers and cuda["LayerNormalization"] == 1
    # For int8: GELU without its bias (the int8 MatMul takes it); attention left as MatMuls.
    int8 = op_counts(graphs["for_int8"])
    assert int8["Gelu"] == layers and int8["Attention"] == int8["BiasGelu"] == 0
    assert int8["Softmax"] == layers and int8["SkipLayerNormalization"] == 0


def test_no_cpu_only_rewrites_and_same_interface(graphs):
    plain, fused = (onnx.load(str(graphs[n])) for n in ("plain", "fused"))
    onnx.checker.check_model(fused)
    assert {o.domain for o in fused.opset_import} <= {"", "ai.onnx", "com.microsoft"}
    assert not fused.graph.value_info  # so the runtime cannot re-fuse SkipLayerNormalization
    for a, b in ((plain.graph.input, fused.graph.input), (plain.graph.output, fused.graph.output)):
        assert [(t.name, t.type) for t in a] == [(t.name, t.type) for t in b]


def test_the_runtime_keeps_the_slow_fusions_out(graphs, tmp_path):
    """ONNX Runtime's own session rewrites bring back neither SkipLayerNormalization (fp32,
    int8) nor, in int8, BiasGelu: the bias goes into the int8 MatMul."""
    for name in ("fused", "int8"):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        ort.InferenceSession(str(graphs[name]), options, providers=["CPUExecutionProvider"])
        counts = op_counts(tmp_path / f"{name}.onnx")
        assert counts["SkipLayerNormalization"] == 0 and counts["LayerNormalization"] > 0
    assert counts["BiasGelu"] == 0 and counts["Gelu"] == 2


@pytest.mark.parametrize(("batch", "words"), [(1, 2), (4, 9), (16, 30), (5, 200)])
@pytest.mark.parametrize("graph", ["fused", "fused_cuda", "for_int8"])
def test_optimised_score_parity(graphs, tiny_models, tiny_source, graph, batch, words):
    _, ranking = tiny_models
    session = ort.InferenceSession(str(graphs[graph]), providers=["CPUExecutionProvider"])
    feeds = pair_feeds(tiny_source.tokenizer(), batch, words, seed=batch * 1000 + words)
    (score,) = session.run(None, feeds)
    with torch.no_grad():
        ref = ranking.score_pairs(*(torch.from_numpy(feeds[k]) for k in feeds))
    assert score.shape == (batch, 1) and score.dtype == np.float32
    assert np.abs(score[:, 0] - ref.numpy()).max() <= 1e-3


def test_int8_quantises_the_projections(graphs, tiny_models, tiny_source):
    layers = _layers(tiny_models)
    counts = op_counts(graphs["int8"])
    # Q, K, V, attention output, FFN up and down; scores and softmax stay fp32.
    assert counts["MatMulInteger"] == 6 * layers and counts["Softmax"] == layers
    # fp32 MatMuls: scores and weighted sum per layer, and the classification head (the
    # quantizer rewrites its two Gemm as MatMul + Add).
    assert counts["MatMul"] == 2 * layers + 2 and counts["Gemm"] == 0
    feeds = pair_feeds(tiny_source.tokenizer(), 16, 30, seed=7)
    fp32, int8 = (
        ort.InferenceSession(str(graphs[n]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for n in ("for_int8", "int8")
    )
    assert int8.shape == fp32.shape and int8.dtype == np.float32
    assert np.corrcoef(fp32[:, 0], int8[:, 0])[0, 1] > 0.95


def test_keep_fp32_leaves_named_nodes_alone(graphs, tmp_path):
    model = onnx.load(str(graphs["for_int8"]))
    first = next(n.name for n in model.graph.node if n.op_type == "MatMul")
    out = quantize_int8(graphs["for_int8"], tmp_path / "int8_keep.onnx", keep_fp32=(first,))
    assert first in {n.name for n in onnx.load(str(out)).graph.node if n.op_type == "MatMul"}
    assert op_counts(out)["MatMulInteger"] == op_counts(graphs["int8"])["MatMulInteger"] - 1


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, {"Attention": 1, "SkipLayerNormalization": 0}),
        ({"quantize_ranker": "int8"}, {"MatMulInteger": 6, "Gelu": 1, "Attention": 0}),
        ({"runtime": "onnxruntime", "gpu": True}, {"Attention": 1, "SkipLayerNormalization": 1}),
        # TensorRT fuses the plain graph itself.
        ({"runtime": "onnxruntime", "gpu": True, "tensorrt": True}, {"Attention": 0}),
    ],
)
def test_the_builder_serves_the_fused_ranker(
    tiny_source, tiny_models, tmp_path, settings, expected
):
    from edje.build_repo import RepoSettings, build_repository

    repo = build_repository(tiny_source, tmp_path / "repo", RepoSettings(**settings))
    counts = op_counts(repo / "edje_ranker" / "1" / "model.onnx")
    layers, per_layer = _layers(tiny_models), {"SkipLayerNormalization": 2}
    for op, present in expected.items():
        assert counts[op] == present * layers * per_layer.get(op, 1), op


def test_int8_scores_depend_on_the_batch_fp32_scores_do_not(graphs, tiny_source):
    # What section 2 of `make bench` reports: dynamic int8 takes one activation scale per
    # batch, so a pair's score moves with its neighbours; fp32's does not (beyond rounding).
    from edje.tools.bench_ranker import batch_dependence, ort_session

    lists = [pair_feeds(tiny_source.tokenizer(), 8, 6, seed) for seed in range(3)]
    fp32 = batch_dependence(ort_session(graphs["fused"], 1), lists)
    int8 = batch_dependence(ort_session(graphs["int8"], 1), lists)
    assert fp32["lists"] == int8["lists"] == 3
    assert fp32["max"] < 1e-4 < int8["max"]
