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


_SPINNING_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def _spinning(model) -> tuple[str, str]:
    """The ranker session's spin-wait entries, read back from ONNX Runtime itself."""
    options = model.session.get_session_options()
    return tuple(options.get_session_config_entry(key) for key in _SPINNING_KEYS)


def test_allow_spinning_and_threads_reach_the_onnx_runtime_session(ranker, repo_dir):
    model, module = ranker
    assert module.SPINNING_KEYS == _SPINNING_KEYS
    # The built default: ORT's own spin-waiting, one intra-op thread per instance.
    assert _spinning(model) == ("1", "1")
    assert model.session.get_session_options().intra_op_num_threads == 1
    quiet, _ = load_model(repo_dir / "edje_ranker", allow_spinning="0", intra_op_thread_count="2")
    assert _spinning(quiet) == ("0", "0")
    assert quiet.session.get_session_options().intra_op_num_threads == 2
    for word, expected in (("false", "0"), ("on", "1"), ("", "1")):  # "" = unset: the default
        other, _ = load_model(repo_dir / "edje_ranker", allow_spinning=word)
        assert _spinning(other) == (expected, expected), word
    with pytest.raises(ValueError, match=r"edje_ranker: parameter 'allow_spinning' = 'maybe'"):
        load_model(repo_dir / "edje_ranker", allow_spinning="maybe")
