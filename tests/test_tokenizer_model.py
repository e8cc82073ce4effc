"""edje_tokenizer's and edje_text_tokenizer's model.py in-process, against the HF tokenizers
and the torch pair layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edje.modeling import build_pair_layout
from tests.triton_stub import InferenceRequest, load_model, read_config

Q, LENGTH = 64, 128
TEXTS = ["a red circle left of a blue square", "", "DOG!", "dog", "a b c " * 400, "café ☕ naïve"]


@pytest.fixture(scope="module")
def tokenizer_model(repo_dir):
    model, _ = load_model(repo_dir / "edje_tokenizer")
    return model


def _request(*texts: str | bytes) -> InferenceRequest:
    items = [t.encode() if isinstance(t, str) else t for t in texts]
    return InferenceRequest(TEXT=np.array([[t] for t in items], dtype=object))


def _outputs(response) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(response.output(n) for n in ("INPUT_IDS", "ATTENTION_MASK", "TOKEN_TYPE_IDS"))


def test_pair_layout_matches_hf_tokenizer(tokenizer_model, tiny_source):
    (response,) = tokenizer_model.execute([_request(*TEXTS)])
    ids, mask, types = _outputs(response)
    ref = tiny_source.tokenizer()(
        TEXTS,
        ["<image>" * Q] * len(TEXTS),
        truncation="only_first",
        max_length=LENGTH,
        padding="max_length",
        return_tensors="np",
    )
    assert ids.shape == (len(TEXTS), LENGTH) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    np.testing.assert_array_equal(types, ref["token_type_ids"])


def test_pair_layout_matches_the_ranking_models_layout(tokenizer_model, tiny_source):
    """What the server builds equals what EDJEModelForRanking.forward builds from plain text."""
    (response,) = tokenizer_model.execute([_request(*TEXTS)])
    ids, mask, types = _outputs(response)
    text = tiny_source.tokenizer()(
        TEXTS, padding=True, truncation=True, max_length=LENGTH - Q - 1, return_tensors="pt"
    )
    image_id = tiny_source.tokenizer().convert_tokens_to_ids("<image>")
    t_ids, t_mask, t_types = build_pair_layout(
        text["input_ids"], text["attention_mask"], Q, image_id
    )
    n = t_ids.shape[1]
    np.testing.assert_array_equal(ids[:, :n], t_ids.numpy())
    np.testing.assert_array_equal(types[:, :n], t_types.numpy())
    np.testing.assert_array_equal(mask[:, :n], t_mask.numpy())
    assert not mask[:, n:].any()
    assert torch.equal(torch.from_numpy(mask).sum(1), t_mask.sum(1))


def test_long_text_is_truncated_not_refused(tokenizer_model, tiny_source):
    (response,) = tokenizer_model.execute([_request("dog " * 100_000)])
    ids, mask, types = _outputs(response)
    image_id = tiny_source.tokenizer().convert_tokens_to_ids("<image>")
    assert mask.sum() == LENGTH  # full, with the image part intact at the end
    assert (ids[0, -Q - 1 : -1] == image_id).all() and types[0, -Q - 1 :].all()


def test_invalid_utf8_fails_only_its_request(tokenizer_model):
    responses = tokenizer_model.execute(
        [_request("dog"), _request(b"\xff\xfe bad"), _request("cat", "dog")]
    )
    assert [r.has_error() for r in responses] == [False, True, False]
    assert responses[1].error.code() == "INVALID_ARG"
    assert "not valid UTF-8" in responses[1].error.message()
    np.testing.assert_array_equal(_outputs(responses[0])[0][0], _outputs(responses[2])[0][1])


class CountingTokenizer:
    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def encode_batch(self, pairs):
        self.calls.append(len(pairs))
        return self.inner.encode_batch(pairs)


def test_requests_are_tokenized_in_one_call(tokenizer_model, monkeypatch):
    counting = CountingTokenizer(tokenizer_model.tokenizer)
    monkeypatch.setattr(tokenizer_model, "tokenizer", counting)
    tokenizer_model.execute([_request("dog", "dog", "dog"), _request("cat"), _request("dog")])
    assert counting.calls == [2]  # one call, and the repeated query is encoded once


def test_text_tokenizer_matches_the_first_stage_hf_tokenizer(repo_dir, tiny_source):
    """edje_text_tokenizer's own model.py: single texts, no image tokens, the tower's length."""
    model, _ = load_model(repo_dir / "edje_text_tokenizer")
    config = read_config(repo_dir / "edje_text_tokenizer")
    length = int(config["parameters"]["max_length"]["string_value"])
    texts = TEXTS
    responses = model.execute([_request(*texts), _request(b"\xff"), _request("dog")])
    assert [r.has_error() for r in responses] == [False, True, False]
    assert "not valid UTF-8" in responses[1].error.message()
    ref = tiny_source.text_tokenizer()(
        texts, truncation=True, max_length=length, padding="max_length", return_tensors="np"
    )
    ids = responses[0].output("INPUT_IDS")
    assert ids.shape == (len(texts), length) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(responses[2].output("INPUT_IDS")[0], ids[texts.index("dog")])


def test_a_bad_parameter_is_refused_at_load_naming_key_and_value(repo_dir):
    with pytest.raises(ValueError, match=r"edje_tokenizer: parameter 'max_length' = 'long'"):
        load_model(repo_dir / "edje_tokenizer", max_length="long")
    with pytest.raises(ValueError, match=r"'max_length' = 10 is below its minimum 67"):
        load_model(repo_dir / "edje_tokenizer", max_length="10")
