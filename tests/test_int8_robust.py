"""Quantisation-aware fine-tuning (edje.training.int8_robust) and its fake int8 (fake_int8)."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from edje.model_source import ModelSource
from edje.tiny import TinySpec, make_tiny_source
from edje.tools.bench_ranker import stress_lists
from edje.training.fake_int8 import fake_int8, projections
from edje.training.int8_robust import Int8Robust, batch_of, int8_robust


def test_fake_int8_passes_gradients_and_changes_no_parameter(tiny_source, tiny_models):
    ranking = copy.deepcopy(tiny_models[1]).eval()
    q, width = ranking.num_compressed_tokens, ranking.language_model.config.hidden_size
    batch = batch_of(stress_lists(tiny_source.tokenizer(), q, width, lists=2, k=3), 0)
    before = {n: p.detach().clone() for n, p in ranking.named_parameters()}
    with torch.no_grad():
        fp32 = ranking.score_pairs(**batch)
    with fake_int8(ranking):
        int8 = ranking.score_pairs(**batch)
    assert (int8 - fp32).abs().max() > 1e-6, "nothing was quantised"
    int8.sum().backward()
    layers = projections(ranking)
    assert len(layers) == 6 * ranking.language_model.config.num_hidden_layers
    for name, m in layers.items():
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name
        assert "forward" not in vars(m), f"{name} keeps the patched forward"
    for n, p in ranking.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    with torch.no_grad():
        assert torch.equal(ranking.score_pairs(**batch), fp32)


def test_int8_robust_pulls_int8_to_fp32_and_writes_a_loadable_source(tmp_path):
    src_dir = tmp_path / "source"
    spec = TinySpec(
        num_compressed_tokens=4, language_width=64, language_heads=2, language_intermediate=128
    )
    original = make_tiny_source(src_dir, spec, seed=0)
    cfg = Int8Robust(
        steps=40, lists_per_step=4, lr=1e-3, warmup=1, validate_every=20,
        validation_lists=12, train_scenes=48,
    )  # fmt: skip
    # Anchor alone: the student starts as the original, so nothing moves.
    still = int8_robust(src_dir, None, replace(cfg, consistency_weight=0.0))["history"]
    assert still[-1]["int8_logit_rms"] == still[0]["int8_logit_rms"] > 0
    assert still[-1]["logit_rms_to_original"] == 0.0
    report = int8_robust(src_dir, tmp_path / "out", cfg)
    first, last = report["history"][0], report["history"][-1]
    assert [r["step"] for r in report["history"]] == [0, 20, 40]
    assert last["int8_logit_rms"] < 0.5 * first["int8_logit_rms"], report["history"]
    assert last["logit_rms_to_original"] > 0, report["history"]
    tuned = ModelSource.from_dir(tmp_path / "out")
    before, _ = original.build_ranking_model()
    after, _ = tuned.build_ranking_model()
    a = dict(before.language_model.named_parameters())
    b = dict(after.language_model.named_parameters())
    words = next(n for n in a if "word_embeddings" in n)
    assert torch.equal(a[words], b[words]), "the word embeddings must stay frozen"
    moved = [n for n in projections(after) if not torch.equal(a[n + ".weight"], b[n + ".weight"])]
    assert len(moved) == len(projections(after)), "every projection is fine-tuned"
