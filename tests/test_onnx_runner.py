"""The python-runtime ONNX runner, ``_shared/onnx_runner.py`` (edje_ranker's model.py runs it)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.triton_stub import InferenceRequest, load_model


@pytest.fixture(scope="module")
def ranker(repo_dir):
    """(the model, the ``onnx_runner`` module its one-line model.py imports it from)."""
    model, _ = load_model(repo_dir / "edje_ranker")
    return model, sys.modules[type(model).__module__]


def _pairs(tokenizer_outputs, tokens):
    ids, mask, types = tokenizer_outputs
    return InferenceRequest(
        input_ids=ids, attention_mask=mask, token_type_ids=types, compressed_tokens=tokens
    )


def _layout(tiny_source, texts):
    enc = tiny_source.tokenizer()(
        texts,
        ["<image>" * 64] * len(texts),
        truncation="only_first",
        max_length=128,
        padding="max_length",
        return_tensors="np",
    )
    return tuple(enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids"))


def test_batch_of_requests_equals_requests_alone_and_nan_fails_alone(ranker, tiny_source):
    model, _ = ranker
    rng = np.random.default_rng(0)
    a = _pairs(
        _layout(tiny_source, ["dog", "a red circle"]),
        rng.standard_normal((2, 64, 384)).astype(np.float16),
    )
    b_tokens = rng.standard_normal((1, 64, 384)).astype(np.float16)
    b_tokens[0, 5, 7] = np.nan
    b = _pairs(_layout(tiny_source, ["cat"]), b_tokens)
    c = _pairs(
        _layout(tiny_source, ["cat " * 50]), rng.standard_normal((1, 64, 384)).astype(np.float16)
    )
    together = model.execute([a, b, c])
    assert [r.has_error() for r in together] == [False, True, False]
    assert together[1].error.code() == "INVALID_ARG" and "NaN" in together[1].error.message()
    alone_a, alone_c = model.execute([a])[0], model.execute([c])[0]
    np.testing.assert_allclose(together[0].output("score"), alone_a.output("score"), atol=1e-5)
    np.testing.assert_allclose(together[2].output("score"), alone_c.output("score"), atol=1e-5)


def test_trimming_trailing_padding_changes_no_result(ranker):
    _, module = ranker
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    feeds = {"attention_mask": mask, "input_ids": mask * 7, "compressed_tokens": np.ones((2, 3, 4))}
    trimmed = module.trim_trailing_padding(feeds, "attention_mask")
    assert trimmed["input_ids"].shape == (2, 3) and trimmed["compressed_tokens"].shape == (2, 3, 4)
    full = {"attention_mask": np.ones((2, 5)), "input_ids": np.ones((2, 5))}
    assert module.trim_trailing_padding(full, "attention_mask")["input_ids"].shape == (2, 5)
