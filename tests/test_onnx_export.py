"""ONNX exports against the PyTorch models, on fresh random inputs."""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edje.onnx_export import export_ranker, export_vision_adapter
from edje.tiny import BASIC_WORDS


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory: pytest.TempPathFactory):
    indexing, ranking = tiny_models
    out = tmp_path_factory.mktemp("onnx")
    return (
        ort.InferenceSession(str(export_vision_adapter(indexing, out / "vision_adapter.onnx"))),
        ort.InferenceSession(str(export_ranker(ranking, out / "ranker.onnx"))),
        out,
    )


def test_graphs_pass_the_checker_and_have_dynamic_axes(exported):
    _, _, out = exported
    for name, dynamic in (
        ("vision_adapter", {"pixel_values": [0]}),
        ("ranker", {"input_ids": [0, 1]}),
    ):
        model = onnx.load(str(out / f"{name}.onnx"))
        onnx.checker.check_model(model)
        inputs = {i.name: i for i in model.graph.input}
        for tensor, axes in dynamic.items():
            dims = inputs[tensor].type.tensor_type.shape.dim
            assert all(dims[a].dim_param for a in axes), f"{name}.{tensor} axes {axes} not dynamic"


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_vision_adapter_parity(exported, tiny_models, batch):
    session, _, _ = exported
    indexing, _ = tiny_models
    pixels = torch.rand(batch, 3, 32, 32) * 2 - 1
    tokens, embedding = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        ref = indexing.encode(pixels)
    assert tokens.dtype == np.float16 and tokens.shape == (batch, 64, 384)
    assert embedding.dtype == np.float32 and embedding.shape == (batch, 64)
    # Equal within fp16 rounding: the ONNX graph casts its fp32 result once.
    expected = ref.compressed_tokens.numpy().astype(np.float16)
    np.testing.assert_allclose(
        tokens.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3
    )
    assert np.mean(tokens == expected) > 0.95
    np.testing.assert_allclose(embedding, ref.image_embedding.numpy(), atol=1e-5)


@pytest.mark.parametrize(("batch", "words"), [(1, 2), (4, 9), (16, 30), (5, 200)])
def test_ranker_parity(exported, tiny_models, tiny_source, batch, words):
    _, session, _ = exported
    _, ranking = tiny_models
    rng = random.Random(batch * 1000 + words)
    texts = [" ".join(rng.choices(BASIC_WORDS, k=rng.randint(0, words))) for _ in range(batch)]
    tok = tiny_source.tokenizer()
    pair = tok(
        texts,
        ["<image>" * 64] * batch,
        truncation="only_first",
        max_length=128,
        padding="longest",
        return_tensors="np",
    )
    feeds = {k: pair[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    feeds["compressed_tokens"] = (
        np.random.default_rng(words).standard_normal((batch, 64, 384)).astype(np.float16)
    )
    (score,) = session.run(None, feeds)
    with torch.no_grad():
        ref = ranking.score_pairs(*(torch.from_numpy(feeds[k]) for k in feeds))
    assert score.shape == (batch, 1) and score.dtype == np.float32
    assert np.abs(score[:, 0] - ref.numpy()).max() <= 1e-3


def test_ranker_export_traces_eager_attention_and_restores_the_model(tiny_models, tmp_path):
    """The export traces attention as MatMul + Softmax (what ONNX Runtime fuses), then gives the
    model back its own attention implementation; ``eager_attention=False`` keeps SDPA's graph."""
    _, ranking = tiny_models
    config = ranking.language_model.config
    before = config._attn_implementation
    eager = onnx.load(str(export_ranker(ranking, tmp_path / "eager.onnx")))
    assert config._attn_implementation == before
    sdpa = onnx.load(str(export_ranker(ranking, tmp_path / "sdpa.onnx", eager_attention=False)))
    assert sum(n.op_type == "Softmax" for n in eager.graph.node) == config.num_hidden_layers
    assert sum(n.op_type == "IsNaN" for n in eager.graph.node) == 0  # SDPA's masking pattern
    assert sum(n.op_type == "IsNaN" for n in sdpa.graph.node) == config.num_hidden_layers
