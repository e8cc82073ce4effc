"""The int8 fake-quantisation study (edje.tools.int8_study) simulates what it says."""

from __future__ import annotations

import copy

import numpy as np
import torch

from edje.tools.bench_ranker import stress_lists
from edje.tools.int8_study import activation_absmax, scores, smoothing, study
from edje.training.fake_int8 import fake_int8, projections


def _lists(tiny_source, ranking, n=3, k=4):
    q = ranking.num_compressed_tokens
    width = ranking.language_model.config.hidden_size
    return stress_lists(tiny_source.tokenizer(), q, width, lists=n, k=k)


def test_smoothing_alone_is_exact_and_the_model_is_restored(tiny_source, tiny_models):
    ranking = tiny_models[1].eval()
    lists = _lists(tiny_source, ranking)
    before = scores(ranking, lists[0])
    factors = smoothing(ranking, activation_absmax(ranking, lists), alpha=0.8)
    assert any(float((f - 1).abs().max()) > 0.1 for f in factors.values()), "nothing moved"
    with fake_int8(ranking, "none", weights=False, smooth=factors):
        np.testing.assert_allclose(scores(ranking, lists[0]), before, atol=1e-4)
    with fake_int8(ranking, "per_tensor"):
        assert np.abs(scores(ranking, lists[0]) - before).max() > 1e-6, "nothing quantised"
    np.testing.assert_array_equal(scores(ranking, lists[0]), before)


def test_per_token_scales_do_not_depend_on_the_batch_per_tensor_do(tiny_source, tiny_models):
    ranking = tiny_models[1].eval()
    feeds = _lists(tiny_source, ranking, n=1, k=6)[0]

    def moved(mode: str) -> float:
        with fake_int8(ranking, mode):
            whole = scores(ranking, feeds)
            alone = np.concatenate(
                [scores(ranking, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(6)]
            )
        return float(np.abs(whole - alone).max())

    assert moved("per_token") < 1e-4
    assert moved("per_tensor") > 1e-4


def test_study_reports_every_scheme(tiny_source, tiny_models):
    ranking = tiny_models[1].eval()
    lists = _lists(tiny_source, ranking)
    report = study(ranking, lists, lists[:1], alphas=[0.5])
    assert set(report) == {
        "weights_only",
        "per_tensor",
        "per_token",
        "smooth_0.5_per_tensor",
        "smooth_0.5_per_token",
    }
    for row in report.values():
        assert row["lists"] == len(lists) and 0.0 <= row["top1_agreement"] <= 1.0


def test_fake_int8_passes_gradients_and_changes_no_parameter(tiny_source, tiny_models):
    ranking = copy.deepcopy(tiny_models[1]).eval()
    q, width = ranking.num_compressed_tokens, ranking.language_model.config.hidden_size
    feeds = stress_lists(tiny_source.tokenizer(), q, width, lists=1, k=3)[0]
    batch = {k: torch.from_numpy(v) for k, v in feeds.items()}
    batch["compressed_tokens"] = batch["compressed_tokens"].float()
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
